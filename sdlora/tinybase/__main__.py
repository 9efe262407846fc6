"""`python -m sdlora.tinybase build ...`: build the built-in base model (see build.py)."""
from sdlora.tinybase.build import main

main()
