//! `nasd cluster status`: the daemons sharing the PostgreSQL database, with their last
//! heartbeat, their lease and how many NAS each owns, then the NAS nobody owns. It reads
//! the database directly, so it works whichever daemon is up (or none).

use chrono::{DateTime, Utc};
use clap::Subcommand;

use crate::api::json::{Owners, SQLITE_CLUSTER_NOTE, cluster_value, seconds};
use crate::api::status::short_age;
use crate::config::Config;
use crate::store::cluster::Member;
use crate::store::{Nas, Store};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The daemons: state, last heartbeat, lease, NAS owned; then the NAS without a
    /// valid owner.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// `nasd cluster status [--json]`.
pub async fn run(cmd: ClusterCommand, cfg: &Config) -> anyhow::Result<()> {
    let ClusterCommand::Status { json } = cmd;
    let store = crate::daemon::open_store(cfg).await?;
    let members = store.cluster_members().await?;
    let nas = store.nas_list().await?;
    let owners = Owners::load(&store, None).await?;
    let now = Utc::now();
    if json {
        let value = cluster_value(None, &members, &nas, &owners, now);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if matches!(store, Store::Sqlite(_)) {
        println!("{SQLITE_CLUSTER_NOTE} (set [database] url to a postgres:// database)");
        return Ok(());
    }
    print!("{}", render(&members, &nas, &owners, now));
    Ok(())
}

/// The text `nasd cluster status` prints on PostgreSQL. Pure, for tests.
pub fn render(members: &[Member], nas: &[Nas], owners: &Owners, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    if members.is_empty() {
        out.push_str("no daemon has joined the cluster on this database yet\n");
    } else {
        let mut rows = vec![
            [
                "ID",
                "HOST",
                "PID",
                "STATE",
                "HEARTBEAT",
                "LEASE",
                "NAS",
                "VERSION",
                "API",
            ]
            .map(str::to_string),
        ];
        for m in members {
            rows.push([
                m.id.clone(),
                m.host.clone(),
                m.pid.to_string(),
                m.state.clone(),
                format!("{} ago", short_age(seconds(now - m.heartbeat_at))),
                if m.alive {
                    format!("{} left", short_age(seconds(m.lease_until - now)))
                } else {
                    "expired".to_string()
                },
                m.owned.to_string(),
                m.version.clone(),
                m.api.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    let enabled = nas.iter().filter(|n| n.enabled).count();
    let unowned = owners.unowned(nas);
    if unowned.is_empty() {
        out.push_str(&format!(
            "every enabled NAS ({enabled}) has a valid owner\n"
        ));
    } else {
        let names: Vec<String> = unowned
            .iter()
            .map(|n| format!("{} ({}, {})", n.id, n.name, n.ip))
            .collect();
        out.push_str(&format!(
            "{} of {enabled} enabled NAS without a valid owner (their events wait): {}\n",
            unowned.len(),
            names.join(", ")
        ));
    }
    out
}

/// Columns left-aligned to their widest cell, two spaces apart; the last column is not
/// padded, so lines carry no trailing blanks.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::cluster::NasOwner;

    fn member(id: &str, state: &str, alive: bool, owned: i64, now: DateTime<Utc>) -> Member {
        Member {
            id: id.into(),
            session: 1,
            host: "db-host".into(),
            pid: 4242,
            version: "0.1.0".into(),
            api: (id == "a").then(|| "127.0.0.1:8082".to_string()),
            state: state.into(),
            alive,
            started_at: now - chrono::Duration::seconds(600),
            heartbeat_at: now - chrono::Duration::milliseconds(400),
            lease_until: if alive {
                now + chrono::Duration::milliseconds(2600)
            } else {
                now - chrono::Duration::seconds(5)
            },
            owned,
        }
    }

    #[test]
    fn the_table_shows_each_daemon_and_the_nas_nobody_owns() {
        let now = Utc::now();
        let members = [
            member("a", "live", true, 1, now),
            member("b-longer-name", "lost", false, 0, now),
        ];
        let nas = [
            Nas::new(1, "Core", "10.0.0.1"),
            Nas::new(2, "Edge", "10.0.0.2"),
        ];
        let owners = Owners::new(
            false,
            None,
            vec![NasOwner {
                nas_id: 1,
                daemon_id: Some("a".into()),
                epoch: 2,
                valid: true,
                since: Some(now),
            }],
        );
        let text = render(&members, &nas, &owners, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "ID             HOST     PID   STATE  HEARTBEAT  LEASE      NAS  VERSION  API",
                "a              db-host  4242  live   0.4s ago   2.6s left  1    0.1.0    127.0.0.1:8082",
                "b-longer-name  db-host  4242  lost   0.4s ago   expired    0    0.1.0    -",
                "1 of 2 enabled NAS without a valid owner (their events wait): 2 (Edge, 10.0.0.2)",
            ]
        );
        let all = Owners::new(
            false,
            None,
            vec![
                NasOwner {
                    nas_id: 1,
                    daemon_id: Some("a".into()),
                    epoch: 2,
                    valid: true,
                    since: Some(now),
                },
                NasOwner {
                    nas_id: 2,
                    daemon_id: Some("a".into()),
                    epoch: 1,
                    valid: true,
                    since: Some(now),
                },
            ],
        );
        assert!(
            render(&[], &nas, &all, now).ends_with("every enabled NAS (2) has a valid owner\n")
        );
        assert!(render(&[], &nas, &all, now).starts_with("no daemon has joined"));
    }
}
