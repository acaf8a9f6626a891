"""``python -m llmopt`` and the console script."""

import sys

from llmopt.cli import main


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
