"""``python -m escoin_torch.bench``: see :mod:`escoin_torch.bench.cli`."""
from escoin_torch.bench.cli import main

raise SystemExit(main())
