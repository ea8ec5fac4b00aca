"""`python -m coordexp.demo`: the one-command demo (see `coordexp.demo.run`)."""
import sys

from coordexp.demo.run import main

sys.exit(main())
