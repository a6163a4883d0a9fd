import sys

from bdh_mlx.cli import main

sys.exit(main())
