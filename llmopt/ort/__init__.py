"""Graph rewrites for the ONNX Runtime build only; the exported ONNX stays standard for TensorRT.

``fuse_gqa`` replaces each layer's standard attention block of an opset-23 export

    MatMul → Reshape → Transpose → RotaryEmbedding ─┐            (q)
    MatMul → Reshape → Transpose → RotaryEmbedding → Concat(past_k) → [repeat_kv] ─┤  (k, present.i.key)
    MatMul → Reshape → Transpose ──────────────────→ Concat(past_v) → [repeat_kv] ─┤  (v, present.i.value)
    attention_mask → causal/padding mask ──────────────────────────────────────────┴→ Attention → Transpose → Reshape

with one ``com.microsoft.GroupQueryAttention`` (rotary inside, ``do_rotary=1``) whose past and present
KV tensors are one preallocated buffer of ``kv_capacity`` positions per layer: the session binds the
same OrtValue as ``past_key_values.i.*`` and ``present.i.*``, so a decode step writes one position and
reads the cache in place, never concatenating or repeating it. The graph inputs become

    input_ids [batch, seq] · attention_mask int64 [batch, total] · past_key_values.* [batch, kv_heads, kv_capacity, head_dim]

ONNX Runtime GenAI's inputs: as its builder does, the graph derives GroupQueryAttention's seqlens_k
(ReduceSum(attention_mask, axis 1) - 1, int32: tokens in the cache after this step - 1) and
total_sequence_length (Shape(attention_mask)[1], int32) from the mask; ``genai_config.py`` writes the
``genai_config.json`` that lets ``onnxruntime_genai.Model(engine_dir)`` run the engine.

and the rows of a batch are right-padded (each row's tokens start at cache position 0; the session
compacts a left-padded batch). The rotary cos/sin tables are computed by running the export's own
position → cos/sin subgraph for positions ``0..kv_capacity-1``, so any rope scaling the exporter traced is
kept exactly.

``fuse_skip_rmsnorm`` turns ``Add → RMSNormalization`` (residual + norm) into
``com.microsoft.SkipSimplifiedLayerNormalization``; ``pack_matmuls`` concatenates the weights of
sibling MatMuls that read the same activation (q/k/v, gate/up) so each layer runs fewer, larger GEMMs;
``quantize_lm_head`` turns the float lm_head MatMul into MatMulNBits (int4/int8, block-wise);
``add_logits_window`` lets a prefill compute the lm_head for its last position only (an input that
defaults to every position); ``quantize_kv_cache`` stores the GroupQueryAttention cache as int8 with
calibrated per-channel scales.
"""

from llmopt.ort.attention import (CAPACITY_DIM, SEQLENS_K, TOTAL_SEQ, find_attention_blocks, fuse_gqa, gqa_io,
                                  rotary_tables)
from llmopt.ort.graph import MS_DOMAIN, RewriteUnsupported, prune
from llmopt.ort.kv_cache import calibrate as calibrate_kv
from llmopt.ort.kv_cache import int8_io, quantize_kv_cache
from llmopt.ort.kv_cache import rotary_of as kv_rotary_of
from llmopt.ort.logits_window import LOGITS_FROM, add_logits_window
from llmopt.ort.lm_head import LM_HEAD_BLOCK, fuse_tied_lm_head, lm_head_node, pack_nbits, quantize_lm_head, rtn_blockwise
from llmopt.ort.store import TensorStore, relocate
from llmopt.ort.norms import fuse_skip_rmsnorm
from llmopt.ort.packing import pack_matmuls

__all__ = ["CAPACITY_DIM", "LM_HEAD_BLOCK", "LOGITS_FROM", "add_logits_window", "MS_DOMAIN", "SEQLENS_K", "TOTAL_SEQ", "RewriteUnsupported",
           "TensorStore", "calibrate_kv", "find_attention_blocks", "fuse_tied_lm_head", "fuse_gqa", "fuse_skip_rmsnorm", "gqa_io", "int8_io",
           "kv_rotary_of", "lm_head_node", "pack_matmuls", "pack_nbits", "prune", "quantize_kv_cache",
           "quantize_lm_head", "relocate", "rotary_tables", "rtn_blockwise"]
