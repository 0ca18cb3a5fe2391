import os
import sys

# test/opinfo.py is imported by name from the tests.
sys.path.insert(0, os.path.dirname(__file__))
