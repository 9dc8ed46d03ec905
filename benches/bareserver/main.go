// The floor of the seed's stack, for benches/bench_seed.py: the seed system's generated
// store.v1.EntityStoreService served by grpc-go (the seed's server framework) with no
// store behind it. CreateEntity and UpdateEntity keep the entity sent as the id's latest
// (a sync.Map store: no clock, no checks, no copy, no watchers) and answer it; GetEntity
// answers the latest (so the loadgen's last_write_visible check holds). Nothing a grpc-go
// server of this API does can be cheaper per call, so the seed's rate over this one's says
// how much of the seed's time is its own code, and meshstore's over this one's how it
// compares with the framework itself.
//
// Built in GOPATH mode against a build of the seed, like the loadgen:
// `source $LATTICE_BUILD/env.sh && go build -o bareserver benches/bareserver/main.go`.
//
//	PORT=50051 bareserver
//
// Listens on 127.0.0.1:$PORT (taken like the seed's entity-store takes it, so the bench
// starts both alike); stops on SIGINT/SIGTERM.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	entityv1 "github.com/boshu2/lattice-lab/gen/entity/v1"
	storev1 "github.com/boshu2/lattice-lab/gen/store/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type bare struct {
	storev1.UnimplementedEntityStoreServiceServer
	latest sync.Map // id -> *entityv1.Entity
}

func (b *bare) CreateEntity(_ context.Context, r *storev1.CreateEntityRequest) (*entityv1.Entity, error) {
	b.latest.Store(r.GetEntity().GetId(), r.GetEntity())
	return r.GetEntity(), nil
}

func (b *bare) UpdateEntity(_ context.Context, r *storev1.UpdateEntityRequest) (*entityv1.Entity, error) {
	b.latest.Store(r.GetEntity().GetId(), r.GetEntity())
	return r.GetEntity(), nil
}

func (b *bare) GetEntity(_ context.Context, r *storev1.GetEntityRequest) (*entityv1.Entity, error) {
	e, ok := b.latest.Load(r.GetId())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "entity %q not found", r.GetId())
	}
	return e.(*entityv1.Entity), nil
}

func main() {
	addr := "127.0.0.1:" + os.Getenv("PORT")
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bareserver: cannot listen on %s: %v\n", addr, err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	storev1.RegisterEntityStoreServiceServer(server, &bare{})
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
		<-signals
		server.Stop()
	}()
	if err := server.Serve(lis); err != nil {
		fmt.Fprintf(os.Stderr, "bareserver: %v\n", err)
		os.Exit(1)
	}
}
