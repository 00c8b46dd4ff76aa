import sys

from gptfluence.cli import main

sys.exit(main())
