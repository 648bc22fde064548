-- Tokens limited to resources (issue 15): the resources a token may be used
-- on, in the store form of `Resources::to_stored` (names and patterns
-- separated by single spaces, sorted; the grammar has no spaces). Empty, as
-- for every existing token, means every resource of its account: a token
-- created before this column allowed every resource and still does. The
-- default also serves inserts by a binary that predates this column during a
-- rolling upgrade (such a binary creates unlimited tokens, as it always did).
ALTER TABLE tokens ADD COLUMN resources TEXT NOT NULL DEFAULT '';
