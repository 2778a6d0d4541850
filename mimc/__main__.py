"""``python -m mimc`` (also what ``torchrun -m mimc`` runs)."""
from .cli.app import main

main()
