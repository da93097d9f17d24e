"""Prints the accelerate launch config `make train-multigpu` uses for a recipe (its mode, after overrides):

python scripts/launch_config.py --config configs/mistral7b_qlora.yaml [key=value ...]
-> accelerate_configs/ddp.yaml   (lora, qlora; full -> accelerate_configs/zero3.yaml)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orpo.config import ConfigError, load_config  # noqa: E402
from orpo.distributed import default_launch_config  # noqa: E402


def main(argv: list[str]) -> str:
    path = None
    if argv[:1] == ["--config"]:
        path, argv = argv[1], argv[2:]
    return default_launch_config(load_config(path, argv))


if __name__ == "__main__":
    try:
        print(main(sys.argv[1:]))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
