// bootseer-stargz-peer: the stargz snapshotter (library sources 0.12 from Debian) served as a containerd
// proxy snapshotter, for BootSeer's start-up benchmark.
//
// Debian packages stargz-snapshotter's library but not its daemon, and the library's `service` package
// needs the Kubernetes CRI API, which Debian does not package.  This program wires the two packages the
// benchmark needs directly: the FUSE filesystem (`fs`, lazy eStargz layers fetched by HTTP range
// requests) and the snapshotter on top of it (`snapshot`), and serves the latter over containerd's
// snapshots gRPC API on a unix socket (`[proxy_plugins.NAME] type = "snapshot"`).  Layers are found
// through the labels `ctr-remote image rpull` sets; registries are reached over plain HTTP (the local
// stack's registry sits on a loopback or veth address without TLS).
//
// Build: integration/bench/stargz/build.sh OUT (GOPATH mode over /usr/share/gocode).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// plainHTTPHosts answers every reference with one plain-HTTP host: the benchmark's registry has no TLS
// and no auth, and it is not on "localhost", which is all the library's default treats as plain HTTP.
// The library reads the host's Client.Transport itself (and tunes its retries when it is a retryable
// round-tripper), so the transport must be set, not left to http.Client's default.
func plainHTTPHosts(timeout time.Duration) source.RegistryHosts {
	retrying := rhttp.NewClient()
	retrying.Logger = nil
	client := &http.Client{Timeout: timeout, Transport: &rhttp.RoundTripper{Client: retrying}}
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		return []docker.RegistryHost{{
			Client:       client,
			Host:         ref.Hostname(),
			Scheme:       "http",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}
}

func main() {
	root := flag.String("root", "", "state directory (snapshots, FUSE mounts, caches)")
	address := flag.String("address", "", "unix socket to serve containerd's snapshots API on")
	noPrefetch := flag.Bool("no-prefetch", false, "ignore the eStargz prefetch landmark")
	noBackground := flag.Bool("no-background-fetch", false, "do not fill layers in the background")
	debug := flag.Bool("debug", false, "debug logging")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "usage: bootseer-stargz-peer -root DIR -address SOCKET")
		os.Exit(2)
	}
	if *debug {
		logrus.SetLevel(logrus.DebugLevel)
	}
	ctx := log.WithLogger(context.Background(), log.L)

	cfg := config.Config{NoPrefetch: *noPrefetch, NoBackgroundFetch: *noBackground, NoPrometheus: true}
	hosts := plainHTTPHosts(5 * time.Minute)
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(layer.OverlayOpaqueTrusted))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("filesystem")
	}
	sn, err := snapshot.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs, snapshot.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("snapshotter")
	}

	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatal("socket dir")
	}
	_ = os.Remove(*address) // a stale socket of a previous run
	lis, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("listen")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		rpc.Stop()
	}()
	log.G(ctx).Infof("serving on %s", *address)
	if err := rpc.Serve(lis); err != nil {
		log.G(ctx).WithError(err).Error("serve")
	}
	// Close unmounts the FUSE layers, so a stopped peer leaves no mounts behind.
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("close")
	}
}
