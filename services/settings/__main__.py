"""``python -m services.settings`` runs the settings service."""

from services.settings.bootstrap import main
from shared.process import install_fast_event_loop

if __name__ == "__main__":
    install_fast_event_loop()
    main()
