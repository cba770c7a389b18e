"""The agent CPU micro-profile (tools.agent_cpu) drives the real simulated path end to end."""

from pathlib import Path

from tools.agent_cpu import measure


async def test_micro_profile_applies_and_reports_every_policy_of_every_agent(
    tmp_path: Path,
) -> None:
    result = await measure(agents=3, policies=4, directory=tmp_path)
    assert result.applied == 12
    assert result.cpu_seconds > 0


async def test_micro_profile_over_http_uses_the_light_client_and_gzipped_policies(
    tmp_path: Path,
) -> None:
    result = await measure(agents=2, policies=3, directory=tmp_path, http=True)
    assert result.applied == 6
