"""``python -m wsgi_async`` runs the ``wsgi-async`` command."""

import sys

from .cli import main

sys.exit(main())
