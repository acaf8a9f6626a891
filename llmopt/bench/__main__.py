"""``python -m llmopt.bench``: a bench worker (see llmopt.bench.worker)."""

from llmopt.bench.worker import worker_main

if __name__ == "__main__":
    worker_main()
