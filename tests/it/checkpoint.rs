use std::time::Duration;

use crate::common::{TestResult, TestStore};

#[test]
fn tracker_batches_writes_and_flushes_on_drop() -> TestResult {
    let t = TestStore::new("ckpt_tracker");
    assert_eq!(t.checkpoint("p")?, None);
    let mut tracker = t
        .tracker("p")?
        .checkpoint_interval(Duration::from_secs(3600));
    assert_eq!(tracker.position(), None);
    tracker.update(10)?;
    tracker.update(20)?;
    assert_eq!(tracker.position(), Some(20));
    assert_eq!(t.checkpoint("p")?, None, "not written before the interval");
    tracker.flush()?;
    assert_eq!(t.checkpoint("p")?, Some(20));
    tracker.update(30)?;
    drop(tracker);
    assert_eq!(t.checkpoint("p")?, Some(30), "written on drop");

    let mut eager = t.tracker("p")?.checkpoint_interval(Duration::ZERO);
    assert_eq!(eager.position(), Some(30));
    assert_eq!(eager.read_options(), pg_eventstore::ReadAll::after(30));
    eager.update(40)?;
    assert_eq!(t.checkpoint("p")?, Some(40));
    assert_eq!(t.checkpoint("other")?, None);
    assert!(t.tracker("").is_err());
    Ok(())
}

#[test]
fn checkpoint_inside_the_callers_transaction() -> TestResult {
    let t = TestStore::new("ckpt_tx");
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.save_checkpoint_in(&mut tx, "model", 7)?;
    tx.rollback()?;
    assert_eq!(t.checkpoint("model")?, None);
    let mut tx = conn.transaction()?;
    t.save_checkpoint_in(&mut tx, "model", 8)?;
    assert_eq!(
        t.checkpoint("model")?,
        None,
        "not visible before the commit"
    );
    tx.commit()?;
    assert_eq!(t.checkpoint("model")?, Some(8));
    t.save_checkpoint("model", 9)?;
    assert_eq!(t.checkpoint("model")?, Some(9));
    Ok(())
}
