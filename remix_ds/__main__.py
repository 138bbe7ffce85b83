"""`python -m remix_ds COMMAND ...`: the same as the installed `remix-ds` command."""
from .console import main

if __name__ == "__main__":
    main()
