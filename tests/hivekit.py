"""A real hive inside the test's trio nursery: the product's HiveAgent (real workers in real cgroups
under this run's root) and, where a queen is given, its HeartbeatSender."""

from __future__ import annotations

import trio

from rbee.config import HiveConfig, parse_config
from rbee.hive.agent import HiveAgent
from rbee.hive.heartbeat import HeartbeatSender

from .conftest import RUN_ROOT, sleeper


def hive_config(tag: str, **settings: object) -> HiveConfig:
    """A hive config for tests: workers are stopped and the cgroup root removed on exit, no GPU.
    ``settings`` are YAML-shaped overrides (``heartbeat={"interval_s": 0.2}``)."""
    base: dict[str, object] = {
        "id": "hive-test", "stop_workers_on_exit": True,
        "cgroup": {"root": f"{RUN_ROOT}/{tag}"}, "collect": {"gpu": "none"},
    }
    base.update(settings)
    return parse_config(base, HiveConfig, "<test>")


def sleeper_specs(count: int) -> list[dict[str, object]]:
    return [{"group": "llm", "instance": f"w{i}", "argv": sleeper()} for i in range(count)]


async def start_hive(nursery: trio.Nursery, config: HiveConfig, queen_url: str | None = None,
                     **sender_options) -> tuple[HiveAgent, HeartbeatSender | None]:
    agent = HiveAgent(config)
    await nursery.start(agent.run)
    sender = None
    if queen_url is not None:
        sender = HeartbeatSender(config.heartbeat, queen_url, agent, **sender_options)
        await nursery.start(sender.run)
    return agent, sender
