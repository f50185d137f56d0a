//! A pooled connection with the store's prepared statements, and transactions on it that
//! append with them: [`Store::append_in`] at the cost of a prepared statement. The same
//! for a connection of yours: [`PreparedAppends`].

use std::ops::{Deref, DerefMut};

use postgres::error::SqlState;
use postgres::GenericClient;
use r2d2::PooledConnection;

use crate::error::{Error, Result};
use crate::event::{AppendResult, EventData};
use crate::store::{Conn, Statements, Store, APPEND_PARAM_TYPES};
use crate::version::ExpectedVersion;

/// A connection checked out of the store's pool, for your own transactions with appends
/// in them. It dereferences to [`postgres::Client`]; [`StoreConnection::transaction`]
/// begins a [`StoreTransaction`]. It goes back to the pool when dropped.
///
/// [`Store::append_in`] works on any client, so it cannot keep a prepared statement
/// there: the server parses and plans its call on every append. A `StoreTransaction`
/// appends with the statements the store has prepared on this connection (prepared at
/// first use, kept across checkouts), which saves that work on every append. A `DISCARD
/// ALL` on it drops those statements and resets its `READ COMMITTED` default: it costs
/// one failed call later (the store's next call on this connection retries it, and
/// every pooled connection prepares its statements again and runs its session setup
/// again; a [`StoreTransaction::append`] fails once with [`Error::NotPreparedHere`]),
/// so avoid it where you can.
///
/// ```no_run
/// # use pg_eventstore::{EventData, ExpectedVersion, Store};
/// # let store = Store::from_env()?;
/// let mut conn = store.connection()?;
/// let mut tx = conn.transaction()?;
/// tx.execute("UPDATE balances SET amount = amount - 10 WHERE id = 1", &[])?;
/// tx.append("account-1", ExpectedVersion::Any, &[
///     EventData::json("Withdrawn", serde_json::json!({ "amount": 10 })),
/// ])?;
/// tx.commit()?;
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
pub struct StoreConnection {
    store: Store,
    conn: Conn,
    /// Taken out of the connection's pool extensions while we have it (the transaction
    /// needs them and the client at once), and put back on drop.
    statements: Statements,
}

impl Store {
    /// A connection from the pool for transactions that append: see [`StoreConnection`].
    /// Waits for a free connection as long as [`Config::connection_timeout`](crate::Config::connection_timeout).
    pub fn connection(&self) -> Result<StoreConnection> {
        let mut conn = self.conn()?;
        let statements = PooledConnection::extensions_mut(&mut conn)
            .remove::<Statements>()
            .unwrap_or_default();
        Ok(StoreConnection {
            store: self.clone(),
            conn,
            statements,
        })
    }
}

impl StoreConnection {
    /// Begins a transaction (`BEGIN`). Like every connection of the store's, this one
    /// defaults to `READ COMMITTED`, whatever the role's `default_transaction_isolation`
    /// (see [`Store::pool`](crate::Store::pool)).
    pub fn transaction(&mut self) -> Result<StoreTransaction<'_>> {
        let tx = self
            .conn
            .transaction()
            .map_err(|e| self.store.map_error(e))?;
        Ok(StoreTransaction {
            store: &self.store,
            tx,
            statements: &mut self.statements,
        })
    }
}

impl Deref for StoreConnection {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        &self.conn
    }
}

impl DerefMut for StoreConnection {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        &mut self.conn
    }
}

impl Drop for StoreConnection {
    fn drop(&mut self) {
        let statements = std::mem::take(&mut self.statements);
        PooledConnection::extensions_mut(&mut self.conn).insert(statements);
    }
}

impl std::fmt::Debug for StoreConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConnection")
            .field("closed", &self.conn.is_closed())
            .finish_non_exhaustive()
    }
}

/// A transaction on a [`StoreConnection`]. It dereferences to [`postgres::Transaction`]
/// for your own statements (and savepoints); pass `&mut *tx` wherever a
/// [`postgres::GenericClient`] is wanted, such as [`Store::save_checkpoint_in`].
/// Dropped without [`commit`](StoreTransaction::commit), it rolls back.
pub struct StoreTransaction<'a> {
    store: &'a Store,
    tx: postgres::Transaction<'a>,
    statements: &'a mut Statements,
}

impl StoreTransaction<'_> {
    /// [`Store::append_in`] in this transaction, with the statements prepared on this
    /// connection: the same checks, errors and wake-ups (subscribers hear of the events
    /// once the transaction commits).
    ///
    /// One event as the transaction's first write (the common case) runs one prepared
    /// statement: the stream's lock (with `Any`), the transaction's id and the insert.
    /// When it writes nothing (a newer version came in while it waited, a repeated event
    /// id, a deleted stream, the wrong version), the full append runs after it and
    /// decides, as in [`Store::append_in`].
    ///
    /// After a `DISCARD ALL` on this connection, which drops its prepared statements, the
    /// next append fails with [`Error::NotPreparedHere`] and forgets them; the one after
    /// prepares them again.
    pub fn append(
        &mut self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult> {
        append_prepared(
            self.store,
            self.statements,
            &mut self.tx,
            stream,
            expected,
            events,
        )
    }

    /// [`Store::lock_for_appends`] for this transaction: call it first, and appends
    /// made later in it are never refused with
    /// [`Error::FeedOrderConflict`](crate::Error::FeedOrderConflict).
    pub fn lock_for_appends(&mut self) -> Result<()> {
        self.store.lock_for_appends(&mut self.tx)
    }

    /// Commits the transaction.
    pub fn commit(self) -> Result<()> {
        self.tx.commit().map_err(|e| self.store.map_error(e))
    }

    /// Rolls the transaction back (as dropping it does, but reporting an error).
    pub fn rollback(self) -> Result<()> {
        self.tx.rollback().map_err(|e| self.store.map_error(e))
    }
}

impl<'a> Deref for StoreTransaction<'a> {
    type Target = postgres::Transaction<'a>;
    fn deref(&self) -> &postgres::Transaction<'a> {
        &self.tx
    }
}

impl<'a> DerefMut for StoreTransaction<'a> {
    fn deref_mut(&mut self) -> &mut postgres::Transaction<'a> {
        &mut self.tx
    }
}

impl std::fmt::Debug for StoreTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTransaction").finish_non_exhaustive()
    }
}

// A connection can be handed to another thread (a worker's, say) and used there.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<StoreConnection>();
};

/// [`Store::append_in`] with its statements prepared on one connection of yours, for a
/// program that keeps its own connections (its own pool, or one client per thread) and
/// appends in its transactions often. [`Store::append_in`] works on any client, so the
/// server parses and plans its call on every append; `PreparedAppends` prepares the
/// statements on the connection at their first use and keeps them, as a
/// [`StoreTransaction`] does on the store's own connections: the same checks, errors,
/// results and wake-ups, for less of the server's work per append.
///
/// One `PreparedAppends` belongs to one connection: make one per connection, keep it
/// beside the connection (for a pooled one, in the pool's per-connection extensions),
/// and give [`PreparedAppends::append`] that connection or a transaction on it. Given
/// another connection, or one whose server session has dropped its prepared statements
/// (`DISCARD ALL`, or a pooler in transaction mode that does not track prepared
/// statements, which hands each transaction to any server session: do not use it
/// there), the append fails with
/// [`Error::NotPreparedHere`], writes nothing and leaves the transaction aborted; the
/// next call prepares the statements again on the connection it is given.
///
/// ```no_run
/// # use pg_eventstore::{EventData, ExpectedVersion, Store};
/// # let store = Store::from_env()?;
/// let mut client = postgres::Client::connect(
///     "postgres://postgres@127.0.0.1:5432/postgres",
///     postgres::NoTls,
/// )?;
/// let mut appends = store.prepared_appends(); // for `client` only
/// for amount in [10, 20, 30] {
///     let mut tx = client.transaction()?;
///     tx.execute("UPDATE balances SET amount = amount - $1 WHERE id = 1", &[&amount])?;
///     appends.append(&mut tx, "account-1", ExpectedVersion::Any, &[
///         EventData::json("Withdrawn", serde_json::json!({ "amount": amount })),
///     ])?;
///     tx.commit()?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PreparedAppends {
    store: Store,
    statements: Statements,
}

impl Store {
    /// Appends with statements prepared on one connection of yours: see
    /// [`PreparedAppends`]. Nothing is prepared until the first append.
    pub fn prepared_appends(&self) -> PreparedAppends {
        PreparedAppends {
            store: self.clone(),
            statements: Statements::default(),
        }
    }
}

impl PreparedAppends {
    /// [`Store::append_in`] on `client` (the connection these statements belong to, or a
    /// transaction on it), with the statements prepared there: see
    /// [`StoreTransaction::append`] for what one event as the transaction's first write
    /// sends.
    pub fn append<C: GenericClient>(
        &mut self,
        client: &mut C,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult> {
        append_prepared(
            &self.store,
            &mut self.statements,
            client,
            stream,
            expected,
            events,
        )
    }
}

/// [`Store::append_in`] on `client` with the append statements of `statements`, which
/// belong to that connection, preparing each there at its first use. If the connection
/// does not have them (another connection, or a session that dropped them), the append
/// fails with [`Error::NotPreparedHere`] and `statements` is emptied, so that the next
/// call prepares them again.
fn append_prepared<C: GenericClient>(
    store: &Store,
    statements: &mut Statements,
    client: &mut C,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult> {
    let mut elsewhere = false;
    let result = store.append_in_with(stream, expected, events, true, |statement, params| {
        let run = statements
            .get(client, statement, &APPEND_PARAM_TYPES)
            .and_then(|prepared| client.query(&prepared, params));
        elsewhere = run
            .as_ref()
            .is_err_and(|e| e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME));
        run
    });
    match result {
        Err(Error::Postgres(source)) if elsewhere => {
            *statements = Statements::default();
            Err(Error::NotPreparedHere { source })
        }
        result => result,
    }
}

impl std::fmt::Debug for PreparedAppends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedAppends")
            .field("prepared", &self.statements.len())
            .finish_non_exhaustive()
    }
}
