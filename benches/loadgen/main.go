// The Go load generator of benches/bench_seed.py: unary UpdateEntity load on any server of
// the seed system's store.v1.EntityStoreService (the seed's own entity-store or `meshstore
// serve`), sent through the seed's generated client the way its sensor-sim sends it: a
// track's "position" component, an entity.v1.PositionComponent packed in an Any.
//
// Built in GOPATH mode against a build of the seed (boshu2/lattice-lab) made by its build
// script: `source $LATTICE_BUILD/env.sh && go build -o loadgen benches/loadgen/main.go`.
//
//	loadgen -addr HOST:PORT -clients N -tracks 1000 -duration 5 -warmup 1 [-rate R]
//
// Set-up creates the tracks (AlreadyExists is fine); then each client, a goroutine with a
// connection of its own, updates its share of the tracks (track i is client i mod N's) one
// call at a time, with lat/lon moving on every write: as fast as the server answers
// (closed loop), or with -rate R at R updates/s in all. Paced clients keep a fixed
// schedule and start together, so calls come in bursts of N, as from sensors that tick
// together; a call that is late goes at once, so the load offered stays R while the
// server keeps up. A call is timed from when it is sent (the sleep before it may overshoot
// by a timer tick). After the warm-up, calls that end inside the measured window are
// counted and timed. Errors are counted, never fatal; the
// first is printed to stderr. stdout gets "window start" and "window end" as the window
// opens and closes (so the caller can read the server's CPU time at those moments), then
// one JSON line: updates_per_s, p50_ms, p99_ms, p999_ms, errors, clients, updates, seconds and
// last_write_visible (each client's last update read back with GetEntity: the server kept
// the position it was sent).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	entityv1 "github.com/boshu2/lattice-lab/gen/entity/v1"
	storev1 "github.com/boshu2/lattice-lab/gen/store/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	warmingUp int32 = iota
	measuring
	stopped
)

type track struct {
	id            string
	lat, lon, alt float64
	dLat, dLon    float64 // degrees per update: every write carries a new position
}

type client struct {
	store     storev1.EntityStoreServiceClient
	tracks    []*track
	latencies []time.Duration
	last      *track // the track of the last successful update, and what it sent
	sentLat   float64
}

var (
	errorCount atomic.Int64
	firstErr   sync.Once
)

func fail(what string, err error) {
	errorCount.Add(1)
	firstErr.Do(func() { fmt.Fprintf(os.Stderr, "loadgen: first error: %s: %v\n", what, err) })
}

func entity(t *track) *entityv1.Entity {
	pos, err := anypb.New(&entityv1.PositionComponent{Lat: t.lat, Lon: t.lon, Alt: t.alt})
	if err != nil {
		panic(err) // packing a generated message cannot fail
	}
	// The seed's store keeps a key's stored value when the write's entity-level HLC is older
	// than the entity's, and a write without one (sensor-sim sends none) is the oldest: the
	// seed would drop every position. Stamped with the wall clock, the write is newer on
	// both servers (meshstore applies a stamp-only write unless the key changed after the
	// stamp), so both do the same work: store the new position. last_write_visible checks it.
	return &entityv1.Entity{
		Id:          t.id,
		Type:        entityv1.EntityType_ENTITY_TYPE_TRACK,
		Components:  map[string]*anypb.Any{"position": pos},
		HlcPhysical: uint64(time.Now().UnixNano()),
		HlcNode:     "loadgen",
	}
}

func (c *client) create() {
	for _, t := range c.tracks {
		_, err := c.store.CreateEntity(context.Background(), &storev1.CreateEntityRequest{Entity: entity(t)})
		if err != nil && status.Code(err) != codes.AlreadyExists {
			fail("CreateEntity "+t.id, err)
		}
	}
}

// run updates the client's tracks until stopped: back to back, or one every `interval`
// (when > 0) on a schedule that never slips.
func (c *client) run(phase *atomic.Int32, interval time.Duration) {
	due := time.Now()
	for i := 0; phase.Load() != stopped; i++ {
		t := c.tracks[i%len(c.tracks)]
		t.lat += t.dLat
		t.lon += t.dLon
		req := &storev1.UpdateEntityRequest{Entity: entity(t)}
		if interval > 0 {
			due = due.Add(interval)
			if wait := time.Until(due); wait > 0 {
				time.Sleep(wait)
			}
		}
		start := time.Now()
		_, err := c.store.UpdateEntity(context.Background(), req)
		elapsed := time.Since(start)
		if err != nil {
			fail("UpdateEntity "+t.id, err)
			continue
		}
		c.last, c.sentLat = t, t.lat
		if phase.Load() == measuring {
			c.latencies = append(c.latencies, elapsed)
		}
	}
}

// lastWriteVisible reads back the client's last updated track: the position it sent must
// be the one stored.
func (c *client) lastWriteVisible() bool {
	if c.last == nil {
		return false
	}
	e, err := c.store.GetEntity(context.Background(), &storev1.GetEntityRequest{Id: c.last.id})
	if err != nil {
		fail("GetEntity "+c.last.id, err)
		return false
	}
	var pos entityv1.PositionComponent
	if err := e.GetComponents()["position"].UnmarshalTo(&pos); err != nil {
		fail("position of "+c.last.id, err)
		return false
	}
	return pos.Lat == c.sentLat
}

// quantile of sorted latencies (nearest rank), in milliseconds.
func quantile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return float64(sorted[max(i, 0)]) / float64(time.Millisecond)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address (host:port)")
	nClients := flag.Int("clients", 1, "concurrent clients, each with its own connection")
	nTracks := flag.Int("tracks", 1000, "tracks to update, spread over the clients")
	duration := flag.Float64("duration", 5, "seconds of the measured window")
	warmup := flag.Float64("warmup", 1, "seconds of load before the window opens")
	rate := flag.Float64("rate", 0, "updates/s in all, spread over the clients on a fixed schedule (0: as fast as answered)")
	flag.Parse()
	if *nClients < 1 || *nTracks < *nClients || *rate < 0 {
		fmt.Fprintln(os.Stderr, "loadgen: need 1 <= clients <= tracks and rate >= 0")
		os.Exit(2)
	}
	var interval time.Duration
	if *rate > 0 {
		interval = time.Duration(float64(*nClients) / *rate * float64(time.Second))
	}

	rng := rand.New(rand.NewSource(1))
	clients := make([]*client, *nClients)
	for i := range clients {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		conn, err := grpc.DialContext(ctx, *addr, grpc.WithInsecure(), grpc.WithBlock())
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: cannot connect to %s: %v\n", *addr, err)
			os.Exit(1)
		}
		defer conn.Close()
		clients[i] = &client{store: storev1.NewEntityStoreServiceClient(conn)}
	}
	for i := 0; i < *nTracks; i++ {
		c := clients[i%*nClients]
		c.tracks = append(c.tracks, &track{
			id:  fmt.Sprintf("bench-track-%d", i),
			lat: 38.8 + rng.Float64()*0.2, lon: -77.2 + rng.Float64()*0.3, alt: 1000 + rng.Float64()*5000,
			dLat: (rng.Float64() - 0.5) * 1e-4, dLon: (rng.Float64() - 0.5) * 1e-4,
		})
	}

	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() { defer wg.Done(); c.create() }()
	}
	wg.Wait()

	var phase atomic.Int32
	for _, c := range clients {
		wg.Add(1)
		go func() { defer wg.Done(); c.run(&phase, interval) }()
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	start := time.Now()
	phase.Store(measuring)
	fmt.Println("window start")
	time.Sleep(time.Duration(*duration * float64(time.Second)))
	phase.Store(stopped)
	seconds := time.Since(start).Seconds()
	fmt.Println("window end")
	wg.Wait()

	var all []time.Duration
	visible := true
	for _, c := range clients {
		all = append(all, c.latencies...)
		visible = c.lastWriteVisible() && visible
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	out, _ := json.Marshal(map[string]any{
		"updates_per_s":      math.Round(float64(len(all)) / seconds),
		"p50_ms":             quantile(all, 0.50),
		"p99_ms":             quantile(all, 0.99),
		"p999_ms":            quantile(all, 0.999),
		"errors":             errorCount.Load(),
		"clients":            *nClients,
		"updates":            len(all),
		"seconds":            seconds,
		"last_write_visible": visible,
	})
	fmt.Println(string(out))
}
