"""Weight (and W8A8 activation) quantization: pure torch, no file I/O except :mod:`.format`.

* :mod:`.rtn` — ``QTensor`` and round-to-nearest (the conventions every method shares)
* :mod:`.packing` — int4 two-per-byte packing in the ONNX INT4 layout
* :mod:`.gptq`, :mod:`.awq`, :mod:`.smoothquant` — the algorithms, per linear / smooth group
* :mod:`.calibrate` — the layer-by-layer driver over a Hugging Face model
* :mod:`.capture` — calibration windows, layer-0 input capture, per-group input statistics
* :mod:`.modules` — module access: weights as ``[out, in]``, scale folding, sub-layer groups, ignores
* :mod:`.format` — the quantized checkpoint on disk and ``load_dequantized``
"""

from llmopt.quant.packing import pack_int4, unpack_int4
from llmopt.quant.rtn import QTensor, dequantize, quantize

__all__ = ["QTensor", "dequantize", "pack_int4", "quantize", "unpack_int4"]
