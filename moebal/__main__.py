import sys

from moebal.cli import main

sys.exit(main())
