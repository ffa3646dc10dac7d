package agent

import (
	"context"
	"path/filepath"
	"sync"

	"github.com/fsnotify/fsnotify"
	"github.com/go-logr/logr"
)

// dnsWatch reconciles moments after the node's resolver files change. It
// watches their directories, not the files: dhclient, NetworkManager and
// resolvconf replace resolv.conf by renaming a new file over it, and a
// watch on the old file (or a bind mount of it, which is why the DaemonSet
// mounts the directory) never sees the new one.
type dnsWatch struct {
	log     logr.Logger
	changed func()

	mu    sync.Mutex
	w     *fsnotify.Watcher
	files map[string]bool // the files read, symbolic links on the way included
	dirs  map[string]bool // the directories watched
}

func newDNSWatch(log logr.Logger, changed func()) *dnsWatch {
	return &dnsWatch{log: log, changed: changed, files: map[string]bool{}, dirs: map[string]bool{}}
}

// follow makes the watch cover files (as nodefacts.ReadResolvers opened
// them). A directory that cannot be watched yet (it does not exist) is
// tried again at the next call, every reconcile.
func (d *dnsWatch) follow(files []string) {
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.w == nil {
		return
	}
	d.files = map[string]bool{}
	for _, f := range files {
		f = filepath.Clean(f)
		d.files[f] = true
		dir := filepath.Dir(f)
		if d.dirs[dir] {
			continue
		}
		if err := d.w.Add(dir); err != nil {
			d.log.V(1).Info("cannot watch the directory of a resolver file yet; the periodic resync still reads it", "dir", dir, "error", err.Error())
			continue
		}
		d.dirs[dir] = true
	}
}

// run delivers events until ctx ends.
func (d *dnsWatch) run(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		d.log.Error(err, "cannot watch the node's resolver files; changes are picked up at the periodic resync")
		return
	}
	defer w.Close()
	d.mu.Lock()
	d.w = w
	d.mu.Unlock()
	d.changed() // a reconcile that calls follow with the files
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			d.mu.Lock()
			ours := d.files[filepath.Clean(ev.Name)]
			if (ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename)) && d.dirs[ev.Name] {
				// A watched directory went: the reconcile this causes
				// watches it again once it is back.
				delete(d.dirs, ev.Name)
				ours = true
			}
			d.mu.Unlock()
			if ours && ev.Op&^fsnotify.Chmod != 0 {
				d.changed()
			}
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			// An overflow loses events: read everything again.
			d.log.Info("watching the resolver files", "error", err.Error())
			d.changed()
		}
	}
}
