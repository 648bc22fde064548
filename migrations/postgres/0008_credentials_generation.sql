-- The generation of an account's credentials: bumped, in the same
-- transaction, by everything that ends all of its sessions (a password
-- change, sign-out everywhere, disabling). A sign-in creates its session
-- only if the generation it read before checking the password is still the
-- account's, so a session cannot be born from a password that was replaced
-- (or from an account signed out or disabled) while it was being checked.
ALTER TABLE accounts ADD COLUMN credentials_generation BIGINT NOT NULL DEFAULT 0;
