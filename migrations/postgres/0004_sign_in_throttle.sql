-- Failed sign-ins, counted per username key (whether or not an account has
-- it) and per client address, so that every replica enforces the same
-- backoff. One row per counter, updated by one atomic upsert per attempt.
-- Times are microseconds since the Unix epoch, like everywhere else.
CREATE TABLE sign_in_throttle (
    -- 'account' (subject: the ASCII-lowercased username) or 'address'
    -- (subject: the client IP, or an IPv6 /64).
    scope          TEXT   NOT NULL,
    subject        TEXT   NOT NULL,
    -- Attempts counted since the last reset (a success resets a username's
    -- count; an address's fades after a quiet period).
    failures       BIGINT NOT NULL,
    last_attempt   BIGINT NOT NULL,
    -- No attempt is allowed before this instant.
    blocked_until  BIGINT NOT NULL,
    -- The block whose first refusal was audited, so that a block is audited
    -- once, not once per refused attempt.
    reported_until BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT sign_in_throttle_pkey PRIMARY KEY (scope, subject),
    CONSTRAINT sign_in_throttle_scope_check CHECK (scope IN ('account', 'address'))
);
