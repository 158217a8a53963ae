"""deploy/compose.yaml runs the shape tests/cluster runs: the same parts, settings and nodes."""

import yaml

from tests.cluster.harness import NODES, ROOT
from tests.cluster.test_production_shape import SHAPE, SHARED_ENV

COMPOSE = ROOT / "deploy" / "compose.yaml"


def _services() -> dict[str, dict[str, object]]:
    document = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, dict[str, object]] = document["services"]
    return services


def test_every_part_is_a_service_with_its_command_and_settings() -> None:
    services = _services()
    for part in SHAPE:
        service = services[part]
        assert service["command"] == [part]
        env = service["environment"]
        assert isinstance(env, dict)
        assert set(SHARED_ENV) <= set(env), part
        # Required, not defaulted: a part without the deployment's key must not start.
        assert str(env["DELIVERY_SECRET_KEY"]).startswith("${DELIVERY_SECRET_KEY:?")
        seeds = str(env["DELIVERY_NATS_URL"]).split(",")
        assert seeds == [f"nats://{node}:4222" for node in NODES]
        assert "postgresql+asyncpg://" in str(env["DELIVERY_DATABASE_URL"])
        check = service["healthcheck"]
        assert isinstance(check, dict)
        port = "8080" if part == "web" else str(env["DELIVERY_OPS_PORT"])
        assert f"http://127.0.0.1:{port}/ready" in " ".join(check["test"])
    assert services["migrate"]["command"] == ["migrate"]


def test_the_nats_nodes_are_the_configs_the_harness_runs() -> None:
    services = _services()
    for node in NODES:
        volumes = services[node]["volumes"]
        assert isinstance(volumes, list)
        assert f"./nats/{node}.conf:/etc/nats/nats.conf:ro" in volumes
        assert (ROOT / "deploy" / "nats" / f"{node}.conf").exists()
