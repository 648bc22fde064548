//! The schema: applying the embedded migrations, and checking that a
//! database holds the ones this build expects.

use super::{SqlStore, StorageError};
use crate::storage::{backend::Backend, rows::SqlRow as _};

/// The versions of the migrations applied successfully, oldest first.
pub(super) const APPLIED_MIGRATIONS: &str =
    "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";

impl<B: Backend> SqlStore<B> {
    /// Applies the embedded migrations that the database lacks.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        self.check_schema(true).await?;
        // sqlx holds an advisory lock across the migrations: on a session of
        // its own (see `Backend::session_pool`).
        crate::storage::migrator(B::MIGRATIONS)
            .run(self.backend.session_pool().unwrap_or(&self.pool))
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => B::classify(inner),
                sqlx::migrate::MigrateError::VersionMismatch(version) => {
                    StorageError::Schema(format!(
                        "migration {version} as applied to the database differs from \
                         the one this build carries; released migrations must never change"
                    ))
                }
                other => StorageError::Other(Box::new(other)),
            })
    }

    /// Compares the migrations applied to the database with the ones
    /// this build carries. A database that has a migration this
    /// build does not know was migrated by a newer release: serving
    /// it could write rows the newer schema forbids, so it is
    /// refused. Unless `will_migrate`, a database lacking some of
    /// this build's migrations is refused too, with a pointer to
    /// `identity migrate`.
    pub async fn check_schema(&self, will_migrate: bool) -> Result<(), StorageError> {
        let applied = if self.migrations_table_exists().await? {
            self.applied_migrations().await?
        } else {
            Vec::new()
        };
        let known = crate::storage::schema_versions(B::MIGRATIONS);
        crate::storage::compare_schema(&applied, &known, will_migrate)
    }

    /// Whether any of this service's migrations has been applied
    /// to the database: `false` for one nobody migrated yet.
    pub async fn schema_applied(&self) -> Result<bool, StorageError> {
        if !self.migrations_table_exists().await? {
            return Ok(false);
        }
        Ok(!self.applied_migrations().await?.is_empty())
    }

    /// Whether the migrations table exists (it does once anything was
    /// migrated).
    async fn migrations_table_exists(&self) -> Result<bool, StorageError> {
        let row = self
            .fetch_optional(sqlx::query(B::SCHEMA_TABLE_EXISTS))
            .await?;
        Ok(row.map(|row| row.int_at(0)).transpose()?.unwrap_or(0) > 0)
    }

    /// The versions of the migrations applied, oldest first.
    async fn applied_migrations(&self) -> Result<Vec<i64>, StorageError> {
        let found = self.fetch_all(sqlx::query(APPLIED_MIGRATIONS)).await?;
        found.iter().map(|row| row.int("version")).collect()
    }
}
