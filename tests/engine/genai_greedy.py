"""Run by the GenAI virtualenv's Python (imports only onnxruntime_genai): greedy tokens from an engine dir.

    python genai_greedy.py ENGINE_DIR '{"prompts": ["text", ...], "new_tokens": N, "chat": [messages]}'

Prints one JSON document: per prompt, GenAI's own tokenization and the generated ids (stopping at the
config's eos ids, as GenAI does), the chat template applied to ``chat`` by GenAI's tokenizer, and the
GenAI version.
"""

import json
import sys

import onnxruntime_genai as og


def main() -> None:
    engine, request = sys.argv[1], json.loads(sys.argv[2])
    model = og.Model(engine)
    tokenizer = og.Tokenizer(model)
    out = []
    for text in request["prompts"]:
        ids = [int(i) for i in tokenizer.encode(text)]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + request["new_tokens"])
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        seq = [int(t) for t in gen.get_sequence(0)]
        out.append({"prompt_ids": ids, "tokens": seq[len(ids):]})
    chat = None
    if request.get("chat"):
        chat = tokenizer.apply_chat_template(json.dumps(request["chat"]), add_generation_prompt=True)
    print(json.dumps({"genai": og.__version__, "results": out, "chat": chat}))


if __name__ == "__main__":
    main()
