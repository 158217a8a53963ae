"""
Notification channels through the official sonzai SDK (sync and async, H and G*), on
SQLite and PostgreSQL, against the API under uvicorn: strict
shapes, composio refused, secrets masked, ``events`` and ``filter`` honoured on deliver,
webhooks signed (verified with the ``standardwebhooks`` library) and email received by
a real SMTP server.
"""

import email
import email.policy
import json
from pathlib import Path

import pytest
import sonzai
import standardwebhooks
from sonzai._generated.models import ChannelDTO, ListChannelsOutputBody
from sonzai._generated.resources.notification_channels import (
    AsyncNotificationChannels,
    NotificationChannels,
)

from delivery.clock import SystemClock
from tests.api.server import serve_api
from tests.channels.conftest import channel_settings
from tests.channels.receivers import WebhookReceiver, smtp_server
from tests.fixtures.http import ServeApp

EVENT = "lead.outreach.send"


def test_sync_sdk_channels(database_url: str, tmp_path: Path, http_server: ServeApp) -> None:
    """Every H call and the G* models round-trip; deliver reaches a webhook and a mailbox."""
    receiver = WebhookReceiver()
    hook_base = http_server(receiver.app())
    with smtp_server() as (smtp_port, mailbox):
        settings = channel_settings(
            tmp_path,
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            smtp_security="plain",
            smtp_from="alerts@example.com",
        )
        with (
            serve_api(database_url, SystemClock(), settings=settings) as served,
            sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
        ):
            generated = NotificationChannels(client._http)

            hook = client.channels.create(
                name="ops hook",
                type="webhook",
                config={"url": f"{hook_base}/hooks/ops"},
                events=[EVENT],
                filter={"agents": ["lead_research"], "min_score": 80},
            )
            assert hook.type == "webhook"
            assert hook.events == [EVENT]
            assert hook.active is True
            assert hook.project_id == served.projects["alpha"]
            assert hook.filter == {"agents": ["lead_research"], "min_score": 80}
            secret = hook.config["secret"]
            assert secret.startswith("whsec_"), "a generated secret is shown once, on create"

            mail = client.channels.create(
                name="ops mail",
                type="email",
                config={"api_key": "re_live_0123456789abcdef", "from": "Ops@Example.com",
                        "to": "oncall@example.com"},
            )  # fmt: skip
            assert mail.events == []
            assert mail.filter is None
            assert mail.config["api_key"] == "****cdef"
            assert mail.config["from"] == "Ops@example.com"

            # Reads mask every secret, including the generated one.
            got = client.channels.get(hook.channel_id)
            assert got.config == {"url": f"{hook_base}/hooks/ops", "secret": f"****{secret[-4:]}"}
            dto = generated.get_channel(hook.channel_id)
            assert isinstance(dto, ChannelDTO)
            assert dto.events == [EVENT]
            listed = client.channels.list()
            assert [c.channel_id for c in listed.channels] == [hook.channel_id, mail.channel_id]
            assert isinstance(generated.list_channels(), ListChannelsOutputBody)
            raw = json.dumps(generated.list_channels().model_dump(mode="json"))
            assert secret not in raw
            assert "re_live_0123456789abcdef" not in raw

            # PUT is a full replace; the masked secret written back keeps the real one.
            updated = client.channels.update(
                hook.channel_id,
                name="ops hook v2",
                type="webhook",
                config=dict(got.config),
                events=[EVENT, "other.event"],
                filter={"agents": ["lead_research"], "min_score": 80},
            )
            assert updated.name == "ops hook v2"
            assert updated.events == [EVENT, "other.event"]
            assert updated.updated_at >= updated.created_at

            with pytest.raises(sonzai.BadRequestError) as refused:
                client.channels.create(name="x", type="composio", config={"agent_id": "a"})
            assert refused.value.code == "UNSUPPORTED_CHANNEL_TYPE"
            with pytest.raises(sonzai.BadRequestError) as bad_url:
                client.channels.create(name="x", type="webhook", config={"url": "ftp://x"})
            assert bad_url.value.code == "INVALID_WEBHOOK_URL"
            with pytest.raises(sonzai.BadRequestError) as bad_header:
                client.channels.create(
                    name="x",
                    type="webhook",
                    config={"url": "https://93.184.216.34/h", "auth_header": "Bearer a\r\nX: 1"},
                )
            assert bad_header.value.code == "INVALID_REQUEST"
            assert "config.auth_header" in str(bad_header.value)
            assert len(client.channels.list().channels) == 2, "a refused create writes nothing"

            # Deliver: the filter rejects a low score, so only the email (all events) goes.
            low = generated.deliver_to_channels(
                event_type=EVENT, payload={"agent_id": "lead_research", "score": 10}
            )
            assert [(d.channel_id, d.status) for d in low.deliveries or []] == [
                (mail.channel_id, "sent")
            ]
            assert mailbox.got.wait(10)
            mime = mailbox.envelopes[0].original_content
            assert mime is not None
            message = email.message_from_bytes(mime, policy=email.policy.default)
            assert message["From"] == "Ops@example.com"
            assert mailbox.envelopes[0].rcpt_tos == ["oncall@example.com"]
            assert message["Subject"] == EVENT

            high = generated.deliver_to_channels(
                event_type=EVENT,
                payload={"agent_id": "lead_research", "score": 92, "subject": "Hot lead"},
            )
            assert sorted((d.type, d.status) for d in high.deliveries or []) == [
                ("email", "sent"),
                ("webhook", "sent"),
            ]
            assert receiver.arrived.wait(10)
            request = receiver.received[0]
            assert request.path == "/hooks/ops"
            body = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
            assert body["event_type"] == EVENT
            assert body["payload"] == {
                "agent_id": "lead_research", "score": 92, "subject": "Hot lead",
            }  # fmt: skip
            assert body["project_id"] == served.projects["alpha"]

            none = generated.deliver_to_channels(event_type="unheard.of", payload={})
            assert [d.type for d in none.deliveries or []] == ["email"]

            # Project variants, and another project's id answering 404.
            alpha = served.projects["alpha"]
            assert len(generated.list_channels_for_project(alpha).channels or []) == 2
            assert generated.get_channel_for_project(alpha, mail.channel_id).name == "ops mail"
            inactive = client.channels.update(
                mail.channel_id, name="ops mail", type="email", active=False
            )
            assert inactive.active is False
            assert inactive.config == {}, "a full replace without config clears it"
            only_hook = generated.deliver_to_channels_for_project(
                alpha, event_type="other.event", payload={"agent_id": "lead_research", "score": 81}
            )
            assert [d.channel_id for d in only_hook.deliveries or []] == [hook.channel_id]
            with pytest.raises(sonzai.NotFoundError):
                generated.list_channels_for_project(served.projects["beta"])
            generated.delete_channel_for_project(alpha, mail.channel_id)
            client.channels.delete(hook.channel_id)
            with pytest.raises(sonzai.NotFoundError) as missing:
                client.channels.get(hook.channel_id)
            assert missing.value.code == "NOT_FOUND"
            assert client.channels.list().channels == []


async def test_async_sdk_channels(database_url: str, tmp_path: Path) -> None:
    """The async twins send the same requests and parse the same shapes; tenants are apart."""
    with serve_api(database_url, SystemClock(), settings=channel_settings(tmp_path)) as served:
        async with (
            sonzai.AsyncSonzai(api_key=served.keys["alpha"], base_url=served.base_url) as alpha,
            sonzai.AsyncSonzai(api_key=served.keys["beta"], base_url=served.base_url) as beta,
        ):
            made = await alpha.channels.create(
                name="mail", type="email", config={"api_key": "short", "from": "a@example.com"}
            )
            assert made.config == {"api_key": "****", "from": "a@example.com"}
            assert (await alpha.channels.get(made.channel_id)).name == "mail"
            with pytest.raises(sonzai.NotFoundError):
                await beta.channels.get(made.channel_id)
            assert (await beta.channels.list()).channels == []
            renamed = await alpha.channels.update(
                made.channel_id, name="mail 2", type="email", config={"api_key": "****"},
                events=["a.b"],
            )  # fmt: skip
            assert renamed.config == {"api_key": "****"}
            with pytest.raises(sonzai.BadRequestError) as refused:
                await alpha.channels.update(made.channel_id, name="x", type="composio")
            assert refused.value.code == "UNSUPPORTED_CHANNEL_TYPE"
            dto = await AsyncNotificationChannels(alpha._http).get_channel(made.channel_id)
            assert dto.events == ["a.b"]
            deliveries = await AsyncNotificationChannels(alpha._http).deliver_to_channels(
                event_type="a.b"
            )
            assert [(d.status, d.error) for d in deliveries.deliveries or []] == [
                ("skipped", "config.to names no recipient")
            ]
            await alpha.channels.delete(made.channel_id)
            assert (await alpha.channels.list()).channels == []
