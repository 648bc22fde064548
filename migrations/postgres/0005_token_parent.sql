-- The token hierarchy: a token created with another personal access token
-- is that token's child, and dies with it. A child names its creator's
-- rotation family (not the creator's own id), so that rotating the creator
-- keeps its children under the successor; every member of a family names
-- the same parent. NULL for tokens created with a session, by
-- `bootstrap-operator`, or before this migration: they have no parent.
ALTER TABLE tokens ADD COLUMN parent_family_id TEXT;

-- Finding a family's children is the step of every cascading revocation.
CREATE INDEX tokens_parent_family_idx ON tokens (parent_family_id)
    WHERE parent_family_id IS NOT NULL;
