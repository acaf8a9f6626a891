"""Train the tiny English Llama shipped as the ``tiny_trained`` preset, from local text only.

Corpus (nothing is downloaded; every source is already on the build machine, read in sorted order):
  * docstrings of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, e.g.
    /root/.pyenv/versions/3.11.7/lib/python3.11), extracted with ``ast``; doctest paragraphs are dropped;
  * English man pages (/usr/share/man/man{1,2,3,5,7,8}, gzip) with groff markup stripped by the small
    converter below; tables, no-fill blocks (synopses, code) and macro definitions are dropped; the 16k
    generated ``gcloud*`` pages are skipped.
Paragraphs that are more than 5% non-ASCII are dropped (keeps the corpus English).
Paragraphs are de-duplicated across the whole corpus (licence and bug-report boilerplate would otherwise
leak between splits), documents are shuffled with a fixed seed and split into eval / calib / train.

Outputs:
  llmopt/presets/text/eval.txt     held-out documents (~80 KB), never trained on
  llmopt/presets/text/calib.txt    calibration documents (~80 KB), not trained on either
  llmopt/presets/tiny_trained/     byte-level BPE tokenizer (4096) + LlamaForCausalLM in float16
                                   safetensors + train_log.json

Reproduce with ``.venv/bin/python scripts/train_tiny.py`` (2 threads; 250 steps of 16x256 tokens, about
4 min on an idle 2-core machine, longer on a busy one). Corpus, splits, tokenizer, initialisation and batch
order are fixed by ``--seed`` and the schedule is step-based, so the run repeats on the same torch build
and thread count. ``--steps 0`` instead fits the cosine schedule to the ``--budget-min`` wall clock
(not repeatable: the step count then depends on how busy the machine is).
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import math
import random
import re
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "llmopt" / "presets" / "tiny_trained"
TEXT = ROOT / "llmopt" / "presets" / "text"
MAN_DIR = Path("/usr/share/man")
MAN_SECTIONS = ("man1", "man2", "man3", "man5", "man7", "man8")
EOT, PAD = "<|endoftext|>", "<|pad|>"
SPLIT_BYTES = 80_000  # target size of eval.txt and calib.txt each

MODEL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=512, max_position_embeddings=2048,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")


# ----------------------------------------------------------------------------------------- corpus
def stdlib_docs(stdlib: Path) -> list[str]:
    """One document per module: its module, class and function docstrings, doctest paragraphs dropped."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "lib2to3", "idlelib") or "test" in rel or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        parts = [p for node in ast.walk(tree) if isinstance(node, kinds)
                 for p in re.split(r"\n\s*\n", ast.get_docstring(node, clean=True) or "")
                 if ">>>" not in p and len(p.split()) >= 4]
        if parts:
            docs.append("\n\n".join(dict.fromkeys(parts)))  # keep order, drop repeats within a file
    return docs


GROFF_CHARS = {"em": "-", "en": "-", "hy": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'",
               "cq": "'", "bu": "*", "co": "(C)", "rg": "(R)", "tm": "(TM)", "mu": "x", "->": "->",
               "<-": "<-", "<=": "<=", ">=": ">=", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "bv": "|"}
SKIP_BLOCKS = {".TS": ".TE", ".EX": ".EE", ".nf": ".fi", ".de": "..", ".ig": "..", ".EQ": ".EN", ".PS": ".PE"}
BREAKS = {".SH", ".SS", ".PP", ".P", ".LP", ".TP", ".IP", ".HP", ".sp", ".RS", ".RE", ".TQ", ".Sh", ".Pp"}
FONT_MACROS = {".B", ".I", ".SM", ".SB"}
ALTERNATING = {".BR", ".RB", ".IR", ".RI", ".BI", ".IB"}  # arguments joined without spaces


def unescape(text: str) -> str:
    text = re.sub(r"\\\((..)", lambda m: GROFF_CHARS.get(m[1], ""), text)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: GROFF_CHARS.get(m[1], ""), text)
    text = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", lambda m: {"(lq": '"', "(rq": '"', "(Aq": "'"}.get(m[1], ""), text)
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)          # font changes
    text = re.sub(r"\\s[+-]?\d", "", text)                       # size changes
    text = re.sub(r"\\[hvwlLNbDoxXYZR]'[^']*'", "", text)        # motions, widths, drawing
    text = re.sub(r"\\[nk](\(..|\[[^\]]*\]|.)", "", text)        # registers
    for esc, char in (("\\-", "-"), ("\\ ", " "), ("\\~", " "), ("\\0", " ")):
        text = text.replace(esc, char)
    text = re.sub(r"\\[&|^,/%:cdupt!]", "", text)
    return re.sub(r"\\(.)", lambda m: "\\" if m[1] == "e" else m[1], text)


def macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_to_text(src: str) -> str:
    """Very small groff ``man`` to plain-text converter: prose paragraphs only."""
    paras, cur, end_skip = [], [], None
    for line in src.splitlines():
        if end_skip is not None:
            end_skip = None if line.startswith(end_skip) else end_skip
            continue
        if line.startswith((".\\\"", "'\\\"", "\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line.partition(" ")
            name = "." + name[1:]
            if name in SKIP_BLOCKS:
                end_skip = SKIP_BLOCKS[name]
                continue
            if name in BREAKS:
                paras.append(" ".join(cur))
                cur = []
                tag = macro_args(rest) if name == ".IP" else []  # .IP "tag": keep word tags, not numbers
                if tag and not tag[0][:1].isdigit():
                    cur.append(unescape(tag[0]))
            elif name in FONT_MACROS | ALTERNATING:
                cur.append(unescape(("" if name in ALTERNATING else " ").join(macro_args(rest))))
            continue  # every other request (.TH, .so, .if, .nr, .ad, .in, ...) is dropped
        cur.append(unescape(line))
    paras = [re.sub(r"\s+", " ", p).strip() for p in paras + [" ".join(cur)]]
    return "\n\n".join(p for p in paras if len(p.split()) >= 2)


def man_docs() -> list[str]:
    paths = [p for s in MAN_SECTIONS for p in sorted((MAN_DIR / s).glob("*.gz"))
             if not p.is_symlink() and not p.name.startswith("gcloud")]
    sources = [gzip.decompress(p.read_bytes()).decode("utf-8", "replace") for p in paths]
    docs = [man_to_text(src) for src in sources if not src.lstrip().startswith(".so ")]  # .so: alias page
    return [d for d in docs if len(d) >= 200]


def build_corpus(seed: int) -> tuple[dict[str, list[str]], dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    py, man = stdlib_docs(stdlib), man_docs()
    seen, docs = set(), []
    for doc in py + man:  # global paragraph de-duplication, first occurrence wins
        keep = [p for p in dict.fromkeys(doc.split("\n\n"))
                if p not in seen and sum(c.isascii() for c in p) >= 0.95 * len(p)]
        seen.update(keep)
        if sum(map(len, keep)) >= 200:
            docs.append("\n\n".join(keep))
    random.Random(seed).shuffle(docs)
    splits = {"eval": [], "calib": [], "train": []}
    for doc in docs:  # whole short documents go to eval, then calib, until each holds SPLIT_BYTES
        held = [k for k in ("eval", "calib") if sum(len(d) + 2 for d in splits[k]) < SPLIT_BYTES]
        splits[held[0] if held and len(doc) <= SPLIT_BYTES // 5 else "train"].append(doc)
    info = {"stdlib_dir": str(stdlib), "stdlib_modules": len(py), "man_pages": len(man),
            "documents": {k: len(v) for k, v in splits.items()},
            "bytes": {k: sum(len(d.encode()) + 2 for d in v) for k, v in splits.items()}}
    return splits, info


# ---------------------------------------------------------------------------------- tokenizer, model
def train_tokenizer(train_docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_docs, trainer=trainer)
    return tok


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to 10% of it as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, chunks: torch.Tensor, args, deadline: float) -> dict:
    """AdamW + cosine. Progress is step / --steps, or else the fraction of the wall-clock budget used,
    so that a run fills its budget (and ends its schedule) however busy the machine is."""
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == d], "weight_decay": 0.1 * d}
              for d in (True, False)]  # no weight decay on norm gains
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    order, pos, losses = torch.randperm(len(chunks), generator=gen), 0, []
    t_start = time.monotonic()
    model.train()
    while True:
        step, now = len(losses), time.monotonic()
        progress = step / args.steps if args.steps else (now - t_start) / max(deadline - t_start, 1e-3)
        if progress >= 1.0:
            break
        if pos + args.batch > len(order):  # next epoch (the corpus is larger than one run needs)
            order, pos = torch.randperm(len(chunks), generator=gen), 0
        x = chunks[order[pos:pos + args.batch]]
        pos += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            print(f"step {len(losses)} loss {sum(losses[-25:]) / 25:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"progress {progress:.0%} {now - t_start:.0f}s", flush=True)
    return {"steps": len(losses), "schedule": "steps" if args.steps else "wall-clock",
            "final_train_loss": round(sum(losses[-25:]) / max(1, len(losses[-25:])), 4),
            "train_wall_s": round(time.monotonic() - t_start, 1)}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, batch: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq`` tokens."""
    model.eval()
    windows = ids[: ids.numel() // seq * seq].view(-1, seq)
    nll = sum(model(input_ids=x, labels=x).loss.item() * x[:, 1:].numel() for x in windows.split(batch))
    return math.exp(nll / windows[:, 1:].numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=12.0, help="wall-clock budget of the whole run")
    ap.add_argument("--steps", type=int, default=250, help="step count (0: fit the --budget-min wall clock instead)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=PRESET, help="preset folder (the texts always go to presets/text)")
    args = ap.parse_args()
    t0 = time.monotonic()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    splits, corpus = build_corpus(args.seed)
    train_docs, eval_text = splits["train"], "\n\n".join(splits["eval"]) + "\n"
    TEXT.mkdir(parents=True, exist_ok=True)
    for name in ("eval", "calib"):
        (TEXT / f"{name}.txt").write_text("\n\n".join(splits[name]) + "\n", encoding="utf-8")
    print(f"corpus: {json.dumps(corpus)} ({time.monotonic() - t0:.0f}s)", flush=True)

    tok = train_tokenizer(train_docs, MODEL["vocab_size"])
    eot_id, pad_id = tok.token_to_id(EOT), tok.token_to_id(PAD)
    assert tok.decode(tok.encode(eval_text).ids) == eval_text, "tokenizer does not round-trip"
    train_ids = torch.tensor([i for e in tok.encode_batch(train_docs) for i in e.ids + [eot_id]])
    eval_ids = torch.tensor(tok.encode(eval_text).ids)
    corpus["tokens"] = {"train": train_ids.numel(), "eval": eval_ids.numel()}
    print(f"tokenizer: train {train_ids.numel():,} tokens, {corpus['bytes']['train'] / train_ids.numel():.2f} "
          f"bytes/token ({time.monotonic() - t0:.0f}s)", flush=True)

    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=pad_id))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    chunks = train_ids[: train_ids.numel() // args.seq * args.seq].view(-1, args.seq)
    stats = train(model, chunks, args, deadline=t0 + args.budget_min * 60 - 30)  # 30 s to eval and save

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.json"), *out.glob("*.safetensors")]:  # only what this script writes
        old.unlink()
    model.generation_config.update(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=pad_id)
    model.to(torch.float16).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
                            model_max_length=MODEL["max_position_embeddings"]).save_pretrained(out)

    # Evaluate what ships: the float16 weights loaded back (upcast) through the public API, offline.
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.is_fast and hf_tok.decode(hf_tok(eval_text).input_ids) == eval_text
    eval_ppl = perplexity(model, eval_ids, args.seq)
    prompt = hf_tok("The function returns", return_tensors="pt")
    sample = hf_tok.decode(model.generate(**prompt, max_new_tokens=40, do_sample=False)[0])
    log = {**stats, "eval_ppl": round(eval_ppl, 3), "eval_tokens": eval_ids.numel(),
           "train_tokens_seen": stats["steps"] * args.batch * args.seq,
           "total_wall_s": round(time.monotonic() - t0, 1), "parameters": n_params, "model": MODEL,
           "corpus": corpus, "sample": sample,
           "args": {k: v for k, v in vars(args).items() if k != "out"},
           "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0,
                         "lr": f"linear warmup {args.warmup} steps, cosine to 10% of peak"},
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"done: {stats['steps']} steps, train loss {stats['final_train_loss']:.3f}, eval ppl {eval_ppl:.2f}, "
          f"{size / 1e6:.2f} MB in {out}, {time.monotonic() - t0:.0f}s\nsample: {sample!r}")


if __name__ == "__main__":
    main()
