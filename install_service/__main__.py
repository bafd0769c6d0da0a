"""`python -m install_service` runs the command line."""

from install_service.cli import main

main()
