import os
import sys

# tests/ holds helpers shared by the test folders (tiny_models.py).
sys.path.insert(0, os.path.dirname(__file__))
