import sys

from omni_train.cli import main

sys.exit(main())
