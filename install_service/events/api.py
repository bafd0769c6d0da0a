"""The change feed and webhooks over HTTP."""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.deps import BEARER, OrgPath, PageParams, Session, User, require_admin
from install_service.events import feed, webhooks
from install_service.events.schemas import (
    Delivery,
    DeliveryPage,
    EventPage,
    EventType,
    WebhookCreate,
    WebhookCreated,
    WebhookEndpoint,
    WebhookPage,
)
from install_service.orgs.service import resolve_org
from install_service.orgs.tokens import current_actor, note_use
from install_service.pagination import PageRequest
from install_service.problems import ADMIN, SIGNED_IN, WITH_BODY, NoBadRequest, problems

Wait = Annotated[
    float,
    QueryParameter(
        ge=0,
        le=feed.MAX_WAIT_SECONDS,
        description="Seconds to wait for an event when none is there yet (long poll; at most "
        f"{feed.MAX_WAIT_SECONDS}).",
    ),
]


async def _follow(
    state: State,
    actor: Actor,
    page: PageRequest,
    wait: float,
    *,
    org_ref: str | None,
    admin: bool = False,
    event_type: str | None = None,
) -> EventPage:
    """Read (and wait) in short transactions of their own: no pooled connection is held while
    waiting, and no transaction id holds the feed's horizon back.

    Every read first checks the caller's access again (token live, user active, still an
    admin or still a member), in the read's own transaction: a poll that waited while its
    caller lost access ends with the 401, 403 or 404 the caller's next request would get,
    never with events it may no longer see."""
    async with transaction(state.engine) as session:
        await note_use(session, actor)
        org = None if org_ref is None else await resolve_org(session, actor, org_ref)
    org_id = None if org is None else org.id

    async def fetch(session: AsyncSession) -> EventPage:
        current = await current_actor(session, actor)
        if admin:
            require_admin(current)
        if org_ref is not None:  # slugs never change: the same org, as the next request sees it
            await resolve_org(session, current, org_ref)
        return await feed.read(session, page, organization_id=org_id, event_type=event_type)

    return await feed.follow(state.engine, state.listener, fetch, organization_id=org_id, wait=wait)


_FEED_DESCRIPTION = (
    "Oldest first, after `cursor`. Store `next_cursor` (never null) and pass it back: every "
    "committed event arrives exactly once, in order, even when transactions commit in a "
    "different order than they began. With `wait`, an empty answer is held until an event "
    "commits or the seconds pass."
)


class OrganizationEventsController(Controller):
    path = "/api/v1/organizations"
    tags = ("events",)
    security = BEARER

    @get(
        "/{org:str}/events",
        operation_id="listOrganizationEvents",
        summary="An organization's change feed",
        description=_FEED_DESCRIPTION,
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def org_events(
        self, state: State, user: User, org: OrgPath, page: PageParams, wait: Wait = 0
    ) -> EventPage:
        return await _follow(state, user, page, wait, org_ref=org)


class AdminEventsController(Controller):
    path = "/api/v1/admin/events"
    tags = ("admin", "events")
    security = BEARER

    @get(
        "/",
        operation_id="listEvents",
        summary="Every organization's change feed",
        description=_FEED_DESCRIPTION,
        responses=problems(*ADMIN, 400, 404),
    )
    async def admin_events(
        self,
        state: State,
        admin: User,
        page: PageParams,
        wait: Wait = 0,
        organization: Annotated[str | None, QueryParameter(max_length=100)] = None,
        event_type: Annotated[EventType | None, QueryParameter(name="type")] = None,
    ) -> EventPage:
        return await _follow(
            state, admin, page, wait, org_ref=organization, admin=True, event_type=event_type
        )


class AdminWebhooksController(Controller):
    path = "/api/v1/admin/webhooks"
    tags = ("admin", "webhooks")
    security = BEARER

    @post(
        "/",
        summary="Add a webhook endpoint",
        description="Answers 201 with the signing secret, shown this once. The URL must be "
        "http(s) and, unless the service allows private addresses, name a public address.",
        operation_id="createWebhook",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 422),
    )
    async def create(
        self, state: State, session: Session, admin: User, data: JSONBody[WebhookCreate]
    ) -> WebhookCreated:
        return await webhooks.create_endpoint(session, admin, data, state.settings.webhooks)

    @get(
        "/",
        operation_id="listWebhooks",
        summary="Webhook endpoints, oldest first",
        responses=problems(*ADMIN, 400),
    )
    async def list_endpoints(self, session: Session, admin: User, page: PageParams) -> WebhookPage:
        return await webhooks.list_endpoints(session, page)

    @get(
        "/{webhook_id:uuid}",
        operation_id="getWebhook",
        operation_class=NoBadRequest,
        summary="One webhook endpoint",
        responses=problems(*ADMIN, 404),
    )
    async def get_endpoint(
        self, session: Session, admin: User, webhook_id: FromPath[uuid.UUID]
    ) -> WebhookEndpoint:
        return await webhooks.get_endpoint(session, webhook_id)

    @post(
        "/{webhook_id:uuid}/disable",
        operation_id="disableWebhook",
        operation_class=NoBadRequest,
        summary="Stop delivering to an endpoint (deliveries wait)",
        status_code=200,
        responses=problems(*ADMIN, 404),
    )
    async def disable(
        self, session: Session, admin: User, webhook_id: FromPath[uuid.UUID]
    ) -> WebhookEndpoint:
        return await webhooks.set_enabled(session, admin, webhook_id, enabled=False)

    @post(
        "/{webhook_id:uuid}/enable",
        operation_id="enableWebhook",
        operation_class=NoBadRequest,
        summary="Deliver to an endpoint again, starting with what waited",
        status_code=200,
        responses=problems(*ADMIN, 404),
    )
    async def enable(
        self, session: Session, admin: User, webhook_id: FromPath[uuid.UUID]
    ) -> WebhookEndpoint:
        return await webhooks.set_enabled(session, admin, webhook_id, enabled=True)

    @delete(
        "/{webhook_id:uuid}",
        operation_id="deleteWebhook",
        operation_class=NoBadRequest,
        summary="Remove an endpoint, its deliveries and their log",
        status_code=200,
        responses=problems(*ADMIN, 404),
    )
    async def remove(
        self, session: Session, admin: User, webhook_id: FromPath[uuid.UUID]
    ) -> WebhookEndpoint:
        return await webhooks.delete_endpoint(session, admin, webhook_id)

    @get(
        "/{webhook_id:uuid}/deliveries",
        operation_id="listWebhookDeliveries",
        summary="An endpoint's deliveries, newest first, with every attempt",
        responses=problems(*ADMIN, 400, 404),
    )
    async def deliveries(
        self, session: Session, admin: User, webhook_id: FromPath[uuid.UUID], page: PageParams
    ) -> DeliveryPage:
        return await webhooks.list_deliveries(session, webhook_id, page)

    @post(
        "/{webhook_id:uuid}/deliveries/{delivery_id:uuid}/redeliver",
        operation_id="redeliverWebhookDelivery",
        operation_class=NoBadRequest,
        summary="Send a delivery again",
        description="202: a pending delivery is retried now, in order; one that succeeded "
        "or was given up is sent once more, on its own. 409 while the endpoint is disabled.",
        status_code=202,
        responses=problems(*ADMIN, 404, 409),
    )
    async def redeliver(
        self,
        request: Request,  # type: ignore[type-arg]
        session: Session,
        admin: User,
        webhook_id: FromPath[uuid.UUID],
        delivery_id: FromPath[uuid.UUID],
    ) -> Response[Delivery]:
        delivery = await webhooks.redeliver(session, admin, webhook_id, delivery_id)
        return Response(delivery, status_code=202)
