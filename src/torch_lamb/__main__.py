"""``python -m torch_lamb demo`` / ``python -m torch_lamb bench``."""

from .cli import main

raise SystemExit(main())
