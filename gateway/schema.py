"""Every table of the gateway, for the models==migrations test and Alembic autogenerate.

Each area keeps its tables in its own module, extending the one metadata of
``gateway.storage.models.Base``, and is listed here, above every area (as
``gateway.app`` is): ``gateway.storage`` itself imports no area. A new area adds
its tables module to this list and its Alembic revisions to
``gateway/storage/migrations/versions``.
"""

from gateway.storage import models  # noqa: F401  (directory tables)
from gateway.storage import blobs  # noqa: F401  (inline blobs: revision 0025_delivery_inline_blobs)
from gateway.mailstore import tables as mailstore_tables  # noqa: F401  (folders, messages, data keys)
from gateway.queue import tables as queue_tables  # noqa: F401  (queue messages and recipients: revision 0003)
from gateway.pipeline import tables as pipeline_tables  # noqa: F401  (conversations: revision 0003)
from gateway.queue import outbound_tables  # noqa: F401  (outbound holds, DKIM signatures, attempts: revision 0004)
from gateway.audit import tables as audit_tables  # noqa: F401  (hash-chained audit log: revision 0005)
from gateway.dmp_bridge import tables as dmp_record_tables  # noqa: F401  (patient record, filing jobs: revision 0006)
from gateway.dmp_bridge import choices_tables as dmp_choices_tables  # noqa: F401  (patient choices: revision 0007)
from gateway.dmp_bridge import notice_tables as dmp_notice_tables  # noqa: F401  (patient access notices: revision 0019)
from gateway.security import smime_policy as smime_tables  # noqa: F401  (S/MIME policies, held keys, inbound results: revision 0008)
from gateway.security import auth_limiter as auth_tables  # noqa: F401  (authentication limiter failures: revision 0010_auth)
from gateway.webmail import tables as webmail_tables  # noqa: F401  (webmail sessions, TOTP, recovery codes: revision 0010_webmail)
from gateway.directory import generation as directory_generation  # noqa: F401  (directory generation: revision 0020_smtpaccept)
from gateway.storage.models import Base

metadata = Base.metadata
