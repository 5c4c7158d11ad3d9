//! An interactive terminal chat against a running `relay-node`.
//!
//! ```text
//! cargo run --bin relay-node -- --data /tmp/relay            # prints <key>@host:port
//! cargo run --example chat -- --relay <key>@127.0.0.1:4433 --store alice.db --create alice
//! cargo run --example chat -- --relay <key>@127.0.0.1:4433 --store bob.db --create bob
//! # a second device of alice: type /invite on the first, then
//! cargo run --example chat -- --relay <key>@127.0.0.1:4433 --store alice2.db --link <code> alice-2
//! ```
//!
//! Type `/help` for the commands; any other line is sent to the open conversation.

use std::path::PathBuf;

use clap::Parser;
use roamsync::engine::{CatchUpProgress, CatchUpStage, Engine, EngineConfig, Event};
use roamsync::ids::{AccountId, ConversationId, MessageId};
use roamsync::model::ListFlag;
use roamsync::net::PeerAddr;
use roamsync::store::StorageKey;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "A terminal chat on roamsync")]
struct Args {
    /// The relay, as `<key>@host:port` (printed by relay-node at start).
    #[arg(long)]
    relay: PeerAddr,
    /// This device's store file.
    #[arg(long)]
    store: PathBuf,
    /// Create a new account with this device name.
    #[arg(long, conflicts_with = "link")]
    create: Option<String>,
    /// Link to an existing account with the code from `/invite`, then a device name.
    #[arg(long, num_args = 2, value_names = ["CODE", "NAME"])]
    link: Option<Vec<String>>,
}

const HELP: &str = "\
/me                       this account's id (give it to others)
/new <title> [account…]   start a conversation with other accounts
/list                     conversations, with unread counts
/open <n>                 open conversation n of /list
/history                  the last 20 messages of the open conversation
/edit <n> <text>          edit message n of /history
/recall <n>               recall message n of /history
/react <n> <emoji>        react to message n of /history
/read                     mark the open conversation read
/draft <text>             save a draft of the open conversation
/pin, /mute, /archive     toggle a flag of the open conversation
/invite                   a code to link another device of this account
/devices                  this account's devices
/status                   connection and upload state
/quit";

struct Chat {
    engine: Engine,
    open: Option<ConversationId>,
    list: Vec<ConversationId>,
    shown: Vec<MessageId>,
}

impl Chat {
    async fn command(&mut self, line: &str) -> Result<bool, String> {
        let e = |x: roamsync::engine::EngineError| x.to_string();
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        let need_open = || "open a conversation first (/list, /open n)".to_owned();
        let nth = |rest: &[&str], shown: &[MessageId]| -> Result<MessageId, String> {
            let n: usize = rest
                .first()
                .and_then(|s| s.parse().ok())
                .ok_or("which message? (a number from /history)")?;
            shown
                .get(n)
                .copied()
                .ok_or_else(|| format!("no message {n}"))
        };
        match cmd {
            "/quit" => return Ok(false),
            "/help" => println!("{HELP}"),
            "/me" => println!("{}", self.engine.account()),
            "/new" => {
                let title = rest.first().ok_or("/new <title> [account…]")?;
                let others = rest[1..]
                    .iter()
                    .map(|a| AccountId::parse_hex(a).map_err(|e| format!("{a}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                let c = self
                    .engine
                    .create_conversation(title, &others)
                    .await
                    .map_err(e)?;
                self.open = Some(c);
                println!("created and opened {title}");
            }
            "/list" => {
                let list = self.engine.conversation_list().await.map_err(e)?;
                self.list = list.iter().map(|s| s.id).collect();
                for (i, s) in list.iter().enumerate() {
                    let last = s
                        .last_message
                        .as_ref()
                        .and_then(|m| m.text.clone())
                        .unwrap_or_default();
                    let flags = [
                        (s.pinned, "pinned"),
                        (s.muted, "muted"),
                        (s.archived, "archived"),
                    ]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(",");
                    println!(
                        "{i:>3} {:<20} unread {:>3} {flags:<10} {last}",
                        s.title, s.unread
                    );
                }
            }
            "/open" => {
                let n: usize = rest
                    .first()
                    .and_then(|s| s.parse().ok())
                    .ok_or("/open <n>")?;
                self.open = Some(
                    *self
                        .list
                        .get(n)
                        .ok_or("no such conversation; /list first")?,
                );
                println!("opened; /history to read");
            }
            "/history" => {
                let c = self.open.ok_or_else(need_open)?;
                let page = self.engine.history(&c, None, 20).await.map_err(e)?;
                self.shown = page.messages.iter().map(|m| m.id).collect();
                for (i, m) in page.messages.iter().enumerate() {
                    let who = if m.author == self.engine.account() {
                        "me".to_owned()
                    } else {
                        short(&m.author)
                    };
                    let body = m.body.as_deref().unwrap_or("(recalled)");
                    let edited = if m.edited { " (edited)" } else { "" };
                    let reactions: Vec<&str> =
                        m.reactions.iter().map(|r| r.reaction.as_str()).collect();
                    println!("{i:>3} {who:>8}: {body}{edited} {}", reactions.join(" "));
                }
            }
            "/edit" => {
                let c = self.open.ok_or_else(need_open)?;
                let id = nth(&rest, &self.shown)?;
                self.engine
                    .edit(&c, &id, &rest[1..].join(" "))
                    .await
                    .map_err(e)?;
            }
            "/recall" => {
                let c = self.open.ok_or_else(need_open)?;
                let id = nth(&rest, &self.shown)?;
                self.engine.recall(&c, &id).await.map_err(e)?;
            }
            "/react" => {
                let c = self.open.ok_or_else(need_open)?;
                let id = nth(&rest, &self.shown)?;
                let emoji = rest.get(1).ok_or("/react <n> <emoji>")?;
                self.engine.react(&c, &id, emoji, true).await.map_err(e)?;
            }
            "/read" => {
                let c = self.open.ok_or_else(need_open)?;
                let page = self.engine.history(&c, None, 1).await.map_err(e)?;
                if let Some(m) = page.messages.last() {
                    self.engine.mark_read(&c, &m.id).await.map_err(e)?;
                }
            }
            "/draft" => {
                let c = self.open.ok_or_else(need_open)?;
                self.engine
                    .set_draft(&c, &rest.join(" "))
                    .await
                    .map_err(e)?;
            }
            "/pin" | "/mute" | "/archive" => {
                let c = self.open.ok_or_else(need_open)?;
                let flag = match cmd {
                    "/pin" => ListFlag::Pinned,
                    "/mute" => ListFlag::Muted,
                    _ => ListFlag::Archived,
                };
                let list = self.engine.conversation_list().await.map_err(e)?;
                let on = list.iter().find(|s| s.id == c).is_some_and(|s| match flag {
                    ListFlag::Pinned => !s.pinned,
                    ListFlag::Muted => !s.muted,
                    _ => !s.archived,
                });
                self.engine.set_flag(&c, flag, on).await.map_err(e)?;
            }
            "/invite" => {
                let code = self.engine.invite_device().await.map_err(e)?;
                println!(
                    "on the new device: --link {code} <name>   (valid for 5 minutes; keep this one running)"
                );
            }
            "/devices" => {
                for d in self.engine.devices().await.map_err(e)? {
                    let me = if d == self.engine.device() {
                        " (this one)"
                    } else {
                        ""
                    };
                    println!("{d:?}{me}");
                }
            }
            "/status" => println!("{:?}", self.engine.sync_status().await.map_err(e)?),
            _ if cmd.starts_with('/') => return Err(format!("unknown command {cmd}; /help")),
            _ => {
                let c = self.open.ok_or_else(need_open)?;
                self.engine.send(&c, line).await.map_err(e)?;
            }
        }
        Ok(true)
    }
}

fn short(a: &AccountId) -> String {
    a.to_string().chars().take(8).collect()
}

/// A progress bar for a relay's catch-up.
fn progress_bar(p: &CatchUpProgress) -> String {
    const WIDTH: u64 = 24;
    let filled = (p.docs_done * WIDTH)
        .checked_div(p.docs_total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let stage = match p.stage {
        CatchUpStage::Conversations => "conversation list",
        CatchUpStage::Recent => "recent messages",
        CatchUpStage::History => "older history",
        CatchUpStage::Done => "up to date",
        _ => "catching up",
    };
    format!(
        "[{}{}] {}/{} documents, {} envelopes, {} KiB — {stage}",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        p.docs_done,
        p.docs_total,
        p.envelopes,
        p.bytes / 1024,
    )
}

fn describe(event: &Event) -> Option<String> {
    Some(match event {
        Event::MessageReceived { .. } => "new message (/history)".into(),
        Event::MessageEdited { .. } => "a message was edited".into(),
        Event::MessageRecalled { .. } => "a message was recalled".into(),
        Event::ReactionsChanged { .. } => "reactions changed".into(),
        Event::ConversationAdded { .. } => "you were added to a conversation (/list)".into(),
        Event::RemovedFromConversation { .. } => "you were removed from a conversation".into(),
        Event::NotDelivered { envelopes, .. } => {
            format!(
                "{envelopes} upload(s) to a conversation you were removed from were not delivered"
            )
        }
        Event::Typing {
            account,
            typing: true,
            ..
        } => format!("{} is typing…", short(account)),
        Event::DeviceLinked { device } => format!("device linked: {device:?}"),
        Event::DeviceRevoked { device } => format!("device revoked: {device:?}"),
        Event::Sync(s) => format!(
            "sync: {} (pending uploads {})",
            s.relays
                .iter()
                .map(|r| format!("{:?}", r.state))
                .collect::<Vec<_>>()
                .join(", "),
            s.pending_uploads
        ),
        Event::RelayError { code, text } => format!("relay refused: {code:?} {text}"),
        Event::Refused { reason, .. } => format!("refused input: {reason}"),
        _ => return None,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // A real app keeps the storage key in the OS keystore; the demo derives it from the path.
    let key =
        StorageKey::from_bytes(*blake3::hash(args.store.to_string_lossy().as_bytes()).as_bytes());
    let config = EngineConfig::new(&args.store, key, vec![args.relay.clone()]);
    let engine = match (&args.create, &args.link) {
        (Some(name), _) => Engine::create_account(config, name).await,
        (_, Some(link)) => Engine::link(config, &link[0], &link[1]).await,
        _ => Engine::open(config).await,
    };
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot start: {e}");
            std::process::exit(1);
        }
    };
    println!("account {} — /help for commands", engine.account());
    let mut events = engine.events();
    let mut chat = Chat {
        engine,
        open: None,
        list: Vec::new(),
        shown: Vec::new(),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut last_states = Vec::new();
    // While a relay catches up, a line per arriving message would flood the screen: the
    // progress bar stands for them.
    let mut catching_up = true;
    let mut last_bar = (CatchUpStage::Conversations, 0);
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match chat.command(line).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => println!("! {e}"),
                }
            }
            event = events.recv() => {
                if let Ok(event) = event {
                    if let Event::CatchUp { progress, .. } = &event {
                        catching_up = progress.stage != CatchUpStage::Done;
                        // A line per stage and per tenth of the documents.
                        let tenth = (progress.docs_done * 10).checked_div(progress.docs_total);
                        let bar = (progress.stage, tenth.unwrap_or(10));
                        if bar != last_bar {
                            last_bar = bar;
                            println!("* {}", progress_bar(progress));
                        }
                        continue;
                    }
                    if catching_up && matches!(event, Event::MessageReceived { .. }) {
                        continue;
                    }
                    // Connection changes are worth a line; upload counts are in /status.
                    if let Event::Sync(s) = &event {
                        let states: Vec<_> = s.relays.iter().map(|r| r.state).collect();
                        if states == last_states {
                            continue;
                        }
                        last_states = states;
                    }
                    if let Some(text) = describe(&event) {
                        println!("* {text}");
                    }
                }
            }
        }
    }
    chat.engine.shutdown().await;
}
