"""The authority's error boundary: where domain errors become gRPC statuses, and only here.

A PatchError carries its code (ABORTED with a VersionConflict detail naming both versions);
anything else is a bug, logged with its traceback and sent as INTERNAL. Messages go through
rpc.status_of, which bounds their length; the errors themselves quote client input with clip().
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc

from cache_authority.ops import PatchError, Status
from positronic import rpc
from positronic.v1 import cache_authority_pb2 as ca

logger = logging.getLogger(__name__)


async def abort_for(context, method: str, error: BaseException, expected_version=None) -> None:
    if isinstance(error, PatchError):
        logger.debug("%s refused: %s %s", method, error.status.value, error.message)
        if error.status is Status.CANCELLED:  # no rich status: nobody is there to read it
            await context.abort(grpc.StatusCode.CANCELLED, error.message)
        details = []
        if error.status is Status.ABORTED and error.current_version is not None:
            details.append(
                ca.VersionConflict(
                    current_version=error.current_version, expected_version=expected_version or 0
                )
            )
        await rpc.abort_async(context, error.status.value, error.message, details)
        return  # abort raised already; this line only documents that
    logger.error("%s failed with a bug", method, exc_info=error)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(error).__name__})"
    )


def unary(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # aborting inside the try would be caught here as a bug
            error = e
        await abort_for(context, fn.__name__, error)

    return wrapper


def streaming(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        messages = fn(self, request, context)
        try:
            async for msg in messages:
                yield msg
            return
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # CancelledError (client gone) is not an Exception: it passes
            error = e
        finally:
            await messages.aclose()  # its stream count is released now, not when collected
        await abort_for(context, fn.__name__, error)

    return wrapper
