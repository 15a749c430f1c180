"""`python -m hfs` is the same as the `hfs` console script."""

from hfs.cli import main

if __name__ == "__main__":
    main()
