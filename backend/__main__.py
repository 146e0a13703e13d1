"""``python -m backend`` is the same as the ``trellis2`` console script."""

from .cli import main

raise SystemExit(main())
