-- The token limit counts an account's live tokens at each creation
-- (COUNT_LIVE_TOKENS). Through tokens_account_idx that visited every token
-- the account ever had, revoked or rotated ones included: an account that
-- created and revoked 400,000 tokens paid 400,000 heap reads per creation.
-- This index holds only the tokens that are their family's current one,
-- ordered by revocation time within the account, so that the count reads
-- the unrevoked ones (revoke_time IS NULL) and those revoked in the future
-- (revoke_time > now) and nothing else.
CREATE INDEX tokens_account_live_idx ON tokens (account_id, revoke_time)
    WHERE replaced_by IS NULL;
