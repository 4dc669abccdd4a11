//! TLS on every link, as an operator runs it: three brokers serving mutual
//! TLS under a cluster CA, a proxy dialing them with its cluster
//! certificate and serving clients over TLS, and clients with the right
//! CA, the wrong CA, or no TLS at all; then processes without a cluster
//! certificate knocking on a broker port; then the proxy's certificate is
//! replaced on disk and new clients meet the new one, with no restart.
//! Certificates come from rcgen. Every process is killed by PID at the
//! end, pass or fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::{free_port, peers_arg, proxy_command, wait_ready, Procs};
use petrel_proto::pb::broker as bpb;
use petrel_sdk::{Client, Message, TopicSpec};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

const READY: Duration = Duration::from_secs(60);

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf for 127.0.0.1 and localhost, usable as server and client.
    fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// Writes `text` to `dir/name` (atomically) and returns the path.
fn put(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

fn tls_client(port: u16, ca: &str) -> Client {
    Client::builder([format!("https://127.0.0.1:{port}")])
        .ca_certificate(ca.as_bytes().to_vec())
        .request_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// A raw broker RPC over `endpoint` (http or https, optionally with a CA
/// and a client certificate): whether it got an answer.
async fn broker_answers(port: u16, ca: Option<&str>, identity: Option<&(String, String)>) -> bool {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    if let Some(ca) = ca {
        let mut t = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        if let Some((c, k)) = identity {
            t = t.identity(tonic::transport::Identity::from_pem(c, k));
        }
        ep = ep.tls_config(t).unwrap();
    }
    let Ok(ch) = ep.connect().await else {
        return false;
    };
    let mut c = bpb::broker_data_client::BrokerDataClient::new(ch);
    c.routes(bpb::RoutesRequest::default()).await.is_ok()
}

/// GET `path` over HTTPS from 127.0.0.1:`port`, trusting only `ca`: the
/// whole response, or why the handshake failed.
async fn https_get(port: u16, ca: &Ca, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// GET `path` over plain HTTP: whatever comes back (nothing, on a TLS port).
fn plain_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_link_speaks_tls_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster_ca = Ca::new("petrel cluster CA");
    let client_ca = Ca::new("petrel client CA");
    let other_ca = Ca::new("someone else's CA");
    let cluster_ca_file = put(d, "cluster-ca.pem", &cluster_ca.pem());

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers = peers_arg(&ports);
    let mut procs = Procs::default();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let (c, k) = cluster_ca.leaf(&format!("broker-{id}"));
        let mut cmd = common::broker_command(id, *port, &peers, d, &[]);
        cmd.arg("--tls-cert")
            .arg(put(d, &format!("b{id}.pem"), &c))
            .arg("--tls-key")
            .arg(put(d, &format!("b{id}.key"), &k))
            .arg("--tls-ca")
            .arg(&cluster_ca_file);
        procs.push(cmd.spawn().unwrap());
    }
    let (pc, pk) = cluster_ca.leaf("proxy");
    let (sc, sk) = client_ca.leaf("proxy.example");
    let (port, admin) = (free_port(), free_port());
    let mut cmd = proxy_command(port, &common::broker_list(&ports));
    cmd.arg("--cluster-cert")
        .arg(put(d, "proxy-cluster.pem", &pc))
        .arg("--cluster-key")
        .arg(put(d, "proxy-cluster.key", &pk))
        .arg("--cluster-ca")
        .arg(&cluster_ca_file)
        .arg("--tls-cert")
        .arg(put(d, "proxy.pem", &sc))
        .arg("--tls-key")
        .arg(put(d, "proxy.key", &sk))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--admin-tls-cert")
        .arg(d.join("proxy.pem"))
        .arg("--admin-tls-key")
        .arg(d.join("proxy.key"));
    procs.push(cmd.spawn().unwrap());

    // The whole path over TLS.
    let client = Client::builder([format!("https://127.0.0.1:{port}")])
        .ca_certificate(client_ca.pem().into_bytes())
        .build()
        .unwrap();
    wait_ready(&client.admin(), 3, READY).await;
    // The admin endpoint speaks HTTPS only: a client trusting the CA
    // scrapes metrics, a plaintext one and one trusting another CA get
    // nothing.
    let scraped = https_get(admin, &client_ca, "/metrics").await.unwrap();
    assert!(
        scraped.starts_with("HTTP/1.1 200") && scraped.contains("petrel_proxy_"),
        "{scraped:.200}"
    );
    assert!(https_get(admin, &other_ca, "/metrics").await.is_err());
    assert!(!plain_get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    client
        .admin()
        .create_topic(TopicSpec::new("secure").queues(2).replicas(3))
        .await
        .unwrap();
    let sent = client
        .producer("secure")
        .build()
        .send(Message::new("over tls"))
        .await
        .unwrap();
    let c = client
        .simple_consumer("secure", "g")
        .wait(Duration::from_secs(1))
        .build();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let b = c.receive(8).await.unwrap();
        if let Some(m) = b.first() {
            c.ack(m).await.unwrap();
            break m.clone();
        }
        assert!(Instant::now() < deadline, "nothing received over TLS");
    };
    assert_eq!(got.message_id, sent.message_id);

    // A plaintext client and one trusting another CA get nowhere.
    let plain = Client::builder([format!("http://127.0.0.1:{port}")])
        .request_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    assert!(plain.admin().describe_cluster().await.is_err());
    assert!(tls_client(port, &other_ca.pem())
        .admin()
        .describe_cluster()
        .await
        .is_err());

    // The broker port: only holders of a cluster certificate.
    let b = ports[0];
    assert!(!broker_answers(b, None, None).await, "plaintext");
    assert!(
        !broker_answers(b, Some(&cluster_ca.pem()), None).await,
        "TLS without a client certificate"
    );
    let stranger = other_ca.leaf("stranger");
    assert!(
        !broker_answers(b, Some(&cluster_ca.pem()), Some(&stranger)).await,
        "a certificate of another CA"
    );
    let member = cluster_ca.leaf("tool");
    assert!(
        broker_answers(b, Some(&cluster_ca.pem()), Some(&member)).await,
        "a cluster certificate gets in"
    );

    // A second proxy with users: a client certificate of the client CA
    // stands in for a signed access key, naming its user.
    let users = d.join("users.toml");
    let file = users.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(common::bin("petrel"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["user", "add", "carol", "--auth-file", file]);
    run(&[
        "acl",
        "add",
        "--auth-file",
        file,
        "--user",
        "carol",
        "--resource",
        "cluster",
        "--actions",
        "describe",
    ]);
    let port2 = free_port();
    let mut cmd = proxy_command(port2, &common::broker_list(&ports));
    cmd.env_remove("PETREL_ALLOW_ANONYMOUS")
        .arg("--auth-file")
        .arg(&users)
        .arg("--cluster-cert")
        .arg(d.join("proxy-cluster.pem"))
        .arg("--cluster-key")
        .arg(d.join("proxy-cluster.key"))
        .arg("--cluster-ca")
        .arg(&cluster_ca_file)
        .arg("--tls-cert")
        .arg(put(d, "proxy2.pem", &sc))
        .arg("--tls-key")
        .arg(put(d, "proxy2.key", &sk))
        .arg("--tls-client-ca")
        .arg(put(d, "client-ca.pem", &client_ca.pem()));
    procs.push(cmd.spawn().unwrap());
    let with_cert = |cn: &str| {
        let (c, k) = client_ca.leaf(cn);
        Client::builder([format!("https://127.0.0.1:{port2}")])
            .ca_certificate(client_ca.pem().into_bytes())
            .identity(c.into_bytes(), k.into_bytes())
            .request_timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let carol = with_cert("carol");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match carol.admin().describe_cluster().await {
            Ok(_) => break,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("carol's certificate was not accepted: {e}"),
        }
    }
    // She may describe the cluster, not list topics.
    let r = carol.admin().list_topics().await;
    assert!(matches!(r, Ok(ref l) if l.topics.is_empty()), "{r:?}");
    let r = carol.admin().delete_topic("secure").await;
    assert!(
        matches!(r, Err(petrel_sdk::Error::PermissionDenied(_))),
        "{r:?}"
    );
    // A certificate naming no user, or none at all: unauthenticated.
    for c in [with_cert("mallory"), tls_client(port2, &client_ca.pem())] {
        let r = c.admin().describe_cluster().await;
        assert!(
            matches!(r, Err(petrel_sdk::Error::Unauthenticated(_))),
            "{r:?}"
        );
    }

    // New certificates on disk: new connections get them, no restart.
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime
    let (nc, nk) = other_ca.leaf("proxy.renewed");
    put(d, "proxy.key", &nk);
    put(d, "proxy.pem", &nc);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tls_client(port, &other_ca.pem())
            .admin()
            .describe_cluster()
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(procs.check_running(3).is_ok(), "the first proxy still runs");
    drop(procs);
}
