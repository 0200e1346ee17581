"""``python -m convmixer_timm``: the ``convmixer-timm`` command line."""
from .cli import main

raise SystemExit(main())
