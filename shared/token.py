"""``python -m shared.token``: mint a dev JWT (refused outside dev mode unless a secret is set)."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.auth import mint_token
from shared.config import ServiceSettings
from shared.messages import Role


def main(
    role: Annotated[str, typer.Option(help="partner, soc or service")] = "soc",
    sub: Annotated[str, typer.Option(help="subject (who)")] = "dev-user",
    account_id: Annotated[str | None, typer.Option(help="account of a partner")] = None,
    ttl: Annotated[int, typer.Option(help="lifetime in seconds")] = 3600,
) -> None:
    """Print a signed HS256 token for the configured HOSTISO_JWT_SECRET (dev default in dev mode)."""
    if role not in ("partner", "soc", "service"):
        raise typer.BadParameter("role must be partner, soc or service", param_hint="--role")
    settings = ServiceSettings()
    secret = settings.require_secret("jwt_secret")
    role_typed: Role = role  # type: ignore[assignment]
    try:
        typer.echo(mint_token(secret, sub=sub, role=role_typed, account_id=account_id, ttl_s=ttl))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--account-id") from exc


if __name__ == "__main__":
    typer.run(main)
