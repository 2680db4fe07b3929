"""The ledger's keys for source rows the dialer wrote without a usable cdr_id (NULL, or too long to be
a task's name): recorded once as skipped under a synthetic key, never sent."""

from __future__ import annotations

from psycopg import sql

#: Ledger key prefix for source rows whose cdr_id is NULL: they are recorded (skipped), never sent.
NULL_CDR_ID_PREFIX = "null-cdr-id:"


#: The longest cdr_id that is sent: Airflow shows it as the mapped task's name, a String(250) column.
MAX_CDR_ID_LENGTH = 200


#: Ledger key prefix (+ md5 of the cdr_id) of longer cdr_ids: recorded (skipped), never sent.
LONG_CDR_ID_PREFIX = "long-cdr-id:"


SYNTHETIC_KEYS = (NULL_CDR_ID_PREFIX + "%", LONG_CDR_ID_PREFIX + "%")

#: The ledger key of a source row ``s`` whose cdr_id is NULL: the md5 of the columns that identify the
#: row, its two times written in UTC to the microsecond. Not of the row's text (``s::text``), which
#: the session's TimeZone and DateStyle and any column added to the view change: the same row would be
#: recorded again under a new key. (to_char gives NULL for an infinite time, json_build_array null.)
NULL_KEY = sql.SQL(
    "{prefix} || md5(json_build_array("
    "to_char(s.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), s.client_id::text, "
    "s.call_id::text, s.callrequest_id::text, s.leg_type::text, s.phone_number::text, "
    "to_char(s.call_date AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'))::text)"
).format(prefix=sql.Literal(NULL_CDR_ID_PREFIX))


SHOWN_ID_CHARS = 60
#: Characters a reason shows as ``?``: controls, bidi marks and line separators (a PostgreSQL regex),
#: so that a reason stays one line that reads as written (Python's reasons escape them: payload.shown).
UNSAFE_IN_REASON = r"[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]"
