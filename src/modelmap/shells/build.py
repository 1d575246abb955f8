"""`python -m modelmap.shells.build`: regenerate the shipped shell tables (see `_build`)."""

from ._build import main

if __name__ == "__main__":
    main()
