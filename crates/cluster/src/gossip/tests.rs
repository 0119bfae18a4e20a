//! The membership task on loopback transports.

use super::*;
use rand::SeedableRng;
use shoal_membership::{Config, LocalNode};
use shoal_transport::{ClusterCa, TransportConfig};

/// Generous bound on waits: only catches hangs.
const HANG: Duration = Duration::from_secs(30);

struct Running {
    addr: SocketAddr,
    transport: Transport,
    commands: mpsc::Sender<MembershipCommand>,
    events: mpsc::Receiver<FromMembership>,
    task: tokio::task::JoinHandle<()>,
}

/// A membership task (not running) of node `name` on a loopback
/// transport, handing its driver events through a queue of `capacity`.
fn task_on_loopback(
    ca: &ClusterCa,
    name: &str,
    capacity: usize,
) -> (
    MembershipTask,
    Transport,
    shoal_transport::Incoming,
    mpsc::Receiver<FromMembership>,
) {
    let identity = ca.issue(&NodeName::new(name).unwrap()).unwrap();
    let (transport, incoming) = Transport::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &identity,
        TransportConfig::default(),
    )
    .unwrap();
    let local = LocalNode {
        name: name.into(),
        generation: 1,
        addr: transport.local_addr(),
        ready: false,
        metadata: Vec::new(),
    };
    let now = Instant::now();
    let membership =
        Membership::new(Config::local(), local, SmallRng::seed_from_u64(7), now).unwrap();
    let (events_tx, events) = mpsc::channel(capacity);
    let task = MembershipTask::new(
        membership,
        Config::local(),
        transport.clone(),
        Arc::new(Counts::default()),
        64,
        events_tx,
        Arc::new(crate::lease::LeaseCell::new(now)),
    );
    (task, transport, incoming, events)
}

/// A membership task on loopback whose queue to the driver holds
/// `capacity` items; nobody reads the transport's messages but this task.
fn start(ca: &ClusterCa, name: &str, capacity: usize) -> Running {
    let (task, transport, incoming, events) = task_on_loopback(ca, name, capacity);
    let addr = transport.local_addr();
    let (messages, datagrams) = incoming.split();
    let (packets_tx, packets_rx) = mpsc::channel(64);
    // Reliable membership messages: what the dispatcher does for them.
    tokio::spawn(async move {
        let mut messages = messages;
        while let Some(m) = messages.recv().await {
            if m.channel == CH_MEMBERSHIP
                && packets_tx
                    .send((m.from.addr, m.from.name, m.body))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    let (commands, commands_rx) = mpsc::channel(16);
    let task = tokio::spawn(task.run(datagrams, packets_rx, commands_rx));
    Running {
        addr,
        transport,
        commands,
        events,
        task,
    }
}

/// Reads what the task hands its driver until a view lists `name`.
async fn wait_view_with(events: &mut mpsc::Receiver<FromMembership>, name: &str) {
    tokio::time::timeout(HANG, async {
        loop {
            if let FromMembership::Event(MEvent::ViewChanged(members)) =
                events.recv().await.unwrap()
                && members.iter().any(|m| &*m.name == name)
            {
                break;
            }
        }
    })
    .await
    .unwrap();
}

async fn stop(node: Running) {
    let _ = node.commands.send(MembershipCommand::Shutdown).await;
    drop(node.events);
    let _ = node.task.await;
    node.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_ready_is_acknowledged_after_the_events_it_caused() {
    let ca = ClusterCa::generate().unwrap();
    let mut a = start(&ca, "a", 64);
    let (tx, mut rx) = oneshot::channel();
    a.commands
        .send(MembershipCommand::SetReady(true, tx))
        .await
        .unwrap();
    let (mut local_ready, mut view_ready) = (false, false);
    tokio::time::timeout(HANG, async {
        loop {
            match a.events.recv().await.unwrap() {
                FromMembership::Local(m) => local_ready = m.ready,
                FromMembership::Event(MEvent::ViewChanged(members)) => {
                    view_ready = members.iter().any(|m| &*m.name == "a" && m.ready);
                }
                FromMembership::Event(_) => {}
                FromMembership::Reborn(m) => panic!("unexpected rebirth as {}", m.generation),
                FromMembership::Ack(ack) => {
                    // Nothing answered the caller before the driver
                    // completes the acknowledgement.
                    assert!(rx.try_recv().is_err());
                    ack.complete();
                    break;
                }
            }
        }
    })
    .await
    .unwrap();
    assert!(local_ready, "the driver got the local record first");
    assert!(view_ready, "and the view with this node ready");
    rx.await.unwrap();
    stop(a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_driver_does_not_stop_membership() {
    let ca = ClusterCa::generate().unwrap();
    // `a`'s driver does not read: its queue holds one item, filled by
    // its first view.
    let mut a = start(&ca, "a", 1);
    let mut b = start(&ca, "b", 64);
    tokio::time::timeout(HANG, async {
        while a.events.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    b.commands
        .send(MembershipCommand::Join(vec![a.addr]))
        .await
        .unwrap();
    // `b` can only learn `a` from `a`'s answer to its join, given while
    // `a`'s queue to its driver is full.
    wait_view_with(&mut b.events, "a").await;
    // Nothing was lost meanwhile: once its driver reads, `a` reports `b`.
    wait_view_with(&mut a.events, "b").await;
    stop(a).await;
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_state_of_non_members_is_swept_once_idle() {
    // Addresses reach the membership task from packets and gossip (a
    // peer can name any address); each gets a link task and maybe a
    // name. Those of no member must go once idle, members' must stay.
    let ca = ClusterCa::generate().unwrap();
    let (mut task, transport, _incoming, _events) = task_on_loopback(&ca, "a", 64);
    let addr = transport.local_addr();
    // Nothing listens on these ports: the link tasks' sends fail, which
    // is what a made-up address gives.
    let strangers: Vec<SocketAddr> = (0..50u16)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 40_000 + i)))
        .collect();
    for &to in &strangers {
        task.names.insert(to, NodeName::new("ghost").unwrap());
        task.send(to, Out::Datagram(Dest::addr(to), Bytes::from_static(b"x")));
    }
    // This node itself is a member: its address stays whatever happens.
    task.send(
        addr,
        Out::Datagram(Dest::addr(addr), Bytes::from_static(b"x")),
    );
    assert_eq!(task.links.len(), strangers.len() + 1);
    // Not idle yet: nothing goes.
    let now = Instant::now();
    task.sweep_links(now, false);
    assert_eq!(task.links.len(), strangers.len() + 1);
    // Idle for LINK_IDLE: the strangers' links and names go, the
    // member's link stays.
    task.sweep_links(now + LINK_IDLE, false);
    assert_eq!(
        task.links.len(),
        1,
        "{:?}",
        task.links.keys().collect::<Vec<_>>()
    );
    assert!(task.links.contains_key(&addr));
    assert!(strangers.iter().all(|s| !task.names.contains_key(s)));
    // Out of room (`all`): every non-member's link goes at once.
    for &to in &strangers[..5] {
        task.send(to, Out::Datagram(Dest::addr(to), Bytes::from_static(b"x")));
    }
    assert_eq!(task.links.len(), 6);
    task.sweep_links(Instant::now(), true);
    assert_eq!(task.links.len(), 1);
    drop(task);
    transport.shutdown().await;
}
