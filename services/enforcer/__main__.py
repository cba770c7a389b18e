"""``python -m services.enforcer``: run the enforcer service."""

from services.enforcer.bootstrap import main
from shared.process import install_fast_event_loop

if __name__ == "__main__":
    install_fast_event_loop()
    main()
