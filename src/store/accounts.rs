//! The accounts of one NAS (`nasd reconcile` compares each with what the NAS holds).

use super::{SqlContext, Store, StoreError};

impl Store {
    /// `(user_id, abonent_id)` of the accounts whose `nas_id` is `nas_id` (only `user`
    /// when given), by user id.
    pub async fn accounts_of_nas(
        &self,
        nas_id: i64,
        user: Option<i64>,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        const SQL_PG: &str = "SELECT user_id, abonent_id FROM accounts WHERE nas_id = $1 \
                              AND ($2::bigint IS NULL OR user_id = $2) ORDER BY user_id";
        const SQL_LITE: &str = "SELECT user_id, abonent_id FROM accounts WHERE nas_id = ?1 \
                                AND (?2 IS NULL OR user_id = ?2) ORDER BY user_id";
        match self {
            Store::Postgres(s) => {
                let mut db = s.open().await.ctx("read the accounts of a nas")?;
                let rows = sqlx::query_as(SQL_PG)
                    .persistent(s.persistent)
                    .bind(nas_id)
                    .bind(user)
                    .fetch_all(db.exec())
                    .await
                    .ctx("read the accounts of a nas")?;
                db.done().await.ctx("read the accounts of a nas")?;
                Ok(rows)
            }
            Store::Sqlite(s) => sqlx::query_as(SQL_LITE)
                .bind(nas_id)
                .bind(user)
                .fetch_all(s.pool())
                .await
                .ctx("read the accounts of a nas"),
        }
    }
}
