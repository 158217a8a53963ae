"""One module per resource; :data:`ROUTERS` is the order they are mounted in."""

from fastapi import APIRouter

from delivery.api.routes import (
    admin,
    channels,
    contacts,
    events,
    inventory,
    notifications,
    policy,
    schedules,
    service,
    stream,
    templates,
    timeline,
    wakeups,
    webhooks,
    workbench,
)

ROUTERS: tuple[APIRouter, ...] = (
    schedules.router,
    wakeups.router,
    events.router,
    inventory.router,
    notifications.router,
    service.router,
    workbench.router,
    webhooks.router,
    contacts.router,
    channels.router,
    templates.router,
    stream.router,
    admin.router,
    timeline.router,
    policy.router,
)
