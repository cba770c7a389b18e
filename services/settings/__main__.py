"""``python -m services.settings`` runs the settings service."""

from services.settings.bootstrap import main

if __name__ == "__main__":
    main()
