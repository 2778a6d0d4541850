"""``python -m mimc`` (also what ``torchrun -m mimc`` runs)."""
from mimc.cli.app import main

main()
